"""Evaluating a model folder on a criteria file: greedy answers, the checks of
`criteria.py`, reward scores, and KL to a reference model.

Answers come from vLLM (fp32, see `vllm_generator.py`) or transformers `generate` (batched,
left padding), as the criteria file's `generation.engine` says; both give the same greedy
tokens, and the answer's token ids end at its first eos either way."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tuneloop.trainer import criteria as cr
from tuneloop.trainer.config import ConfigError
from tuneloop.trainer.modeling import load_policy, load_tokenizer
from tuneloop.trainer.rewards import RewardFunc

if TYPE_CHECKING:
    from tuneloop.trainer.vllm_generator import VllmGenerator

log = logging.getLogger(__name__)

Messages = list[dict[str, str]]
Answer = tuple[str, list[int]]


def _messages(prompt: str, spec: cr.Generation) -> Messages:
    system = [{"role": "system", "content": spec.system_prompt}] if spec.system_prompt else []
    return [*system, {"role": "user", "content": prompt}]


def _texts(tokenizer: Any, prompts: list[Messages]) -> tuple[list[str], bool]:
    """Prompt texts, and whether the tokenizer adds its special tokens (not after a chat template)."""
    if tokenizer.chat_template:
        return [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in prompts], False
    return ["\n".join(m["content"] for m in p) for p in prompts], True


def _encode(tokenizer: Any, prompts: list[Messages]) -> dict[str, torch.Tensor]:
    texts, special = _texts(tokenizer, prompts)
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=special)


def prompt_ids(tokenizer: Any, prompts: list[Messages]) -> list[list[int]]:
    """Each prompt's token ids, unpadded: what `_encode` feeds `generate`, less the padding."""
    texts, special = _texts(tokenizer, prompts)
    return tokenizer(texts, add_special_tokens=special)["input_ids"]


def _answer(tokenizer: Any, row: list[int]) -> Answer:
    eos = tokenizer.eos_token_id
    ids = row[: row.index(eos) + 1] if eos in row else row
    answer = [t for t in ids if t != tokenizer.pad_token_id]
    return tokenizer.decode(answer, skip_special_tokens=True).strip(), answer


@torch.no_grad()
def generate(model: Any, tokenizer: Any, prompts: list[Messages], spec: cr.Generation) -> list[Answer]:
    """Greedy (answer text, answer token ids) per prompt with transformers; token ids stop at the first eos."""
    out: list[Answer] = []
    for start in range(0, len(prompts), spec.batch_size):
        enc = _encode(tokenizer, prompts[start : start + spec.batch_size]).to(model.device)
        generated = model.generate(
            **enc,
            do_sample=False,
            max_new_tokens=spec.max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        out += [_answer(tokenizer, row) for row in generated[:, enc["input_ids"].shape[1] :].tolist()]
    return out


def generate_vllm(engine: VllmGenerator, tokenizer: Any, prompts: list[Messages], spec: cr.Generation) -> list[Answer]:
    """`generate`'s answers, through a vLLM engine: the same prompt tokens, the same eos, and
    decoded here as there, so the text matches too."""
    rows = engine.generate(prompt_ids(tokenizer, prompts), spec.max_new_tokens, tokenizer.eos_token_id)
    return [_answer(tokenizer, row) for row in rows]


def choose_engine(spec: cr.Generation, model_dir: Path | str) -> str:
    """What answers with `model_dir` under `spec.engine`: "vllm" or "transformers".
    auto logs why it does not take vLLM; vllm fails (ConfigError) when vLLM cannot run here."""
    if spec.engine == "transformers":
        return "transformers"
    from tuneloop.trainer.vllm_generator import parameter_count, unusable_reason

    reason = unusable_reason(model_dir)
    if spec.engine == "vllm":
        if reason is not None:
            raise ConfigError(f"generation.engine is vllm, but vLLM cannot answer with {model_dir}: {reason}")
        return "vllm"
    if reason is None and (count := parameter_count(model_dir)) < spec.vllm_min_parameters:
        reason = (
            f"the model has {count:,} parameters, fewer than generation.vllm_min_parameters "
            f"({spec.vllm_min_parameters:,}): transformers answers before vLLM would have started"
        )
    if reason is not None:
        log.info("generation.engine auto: answering with transformers, not vLLM: %s", reason)
        return "transformers"
    return "vllm"


def _engine_size(tokenizer: Any, prompts: list[Messages], spec: cr.Generation) -> tuple[int, int]:
    """(max_model_len, KV cache tokens) for answering `prompts` all at once under `spec`."""
    lengths = [len(ids) for ids in prompt_ids(tokenizer, prompts)]
    return max(lengths) + spec.max_new_tokens, sum(lengths) + len(lengths) * spec.max_new_tokens


# Config keys that differ between a model and its fine-tuned descendants without changing the
# tensors an engine holds.
_UNSHAPED_KEYS = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "use_cache"}


def _shape(model_dir: Path | str) -> dict[str, Any]:
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return {k: v for k, v in config.items() if k not in _UNSHAPED_KEYS}


class EngineKeeper:
    """One vLLM engine for several evaluations of models of one shape: a retrain evaluates the
    parent, measures the live model during training (the watch) and evaluates the candidate,
    and an engine's start (about 50 s for a 135M model on two cores) costs more than any of
    those answers. A model of another shape, or prompts that need a larger engine, start a
    new one; weights are swapped in place (about a second) otherwise."""

    def __init__(self) -> None:
        self._engine: VllmGenerator | None = None
        self._shape: dict[str, Any] | None = None
        self._size = (0, 0)
        self._weights: Path | None = None
        self.starts = 0

    def engine(self, model_dir: Path | str, tokenizer: Any, prompts: list[Messages], spec: cr.Generation) -> VllmGenerator:
        """An engine for models shaped as `model_dir` that can answer `prompts` at once under
        `spec`. A new one holds `model_dir`'s weights; one kept holds what it was last given
        (see `load`)."""
        from tuneloop.trainer.vllm_generator import VllmGenerator

        max_model_len, kv_tokens = _engine_size(tokenizer, prompts, spec)
        shape = _shape(model_dir)
        fits = max_model_len <= self._size[0] and kv_tokens <= self._size[1]
        if self._engine is None or shape != self._shape or not fits:
            self.close()
            self._engine = VllmGenerator(model_dir, max_model_len=max_model_len, kv_tokens=kv_tokens)
            self._shape, self._size, self._weights = shape, (max_model_len, kv_tokens), Path(model_dir)
            self.starts += 1
        return self._engine

    def load(self, weights_dir: Path | str, *, changed: bool = True) -> None:
        """Puts `weights_dir`'s weights in the engine; unless `changed`, not when it already holds them."""
        assert self._engine is not None
        if changed or Path(weights_dir) != self._weights:
            self._engine.load_weights(weights_dir)
            self._weights = Path(weights_dir)

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()
        self._engine, self._shape, self._size, self._weights = None, None, (0, 0), None


_kept: EngineKeeper | None = None


@contextlib.contextmanager
def keep_engine() -> Iterator[EngineKeeper]:
    """Within this block, evaluations and watch measurements of this process share one engine
    (`EngineKeeper`); it stops at the end of the block."""
    global _kept
    outer, _kept = _kept, EngineKeeper()
    try:
        yield _kept
    finally:
        _kept.close()
        _kept = outer


def kept_engine() -> EngineKeeper | None:
    """The keeper of the enclosing `keep_engine` block, if any."""
    return _kept


def release_engine() -> None:
    """Stops the kept engine now (a later evaluation starts another): before processes that
    need the memory it holds, such as a training stage on several processes."""
    if _kept is not None:
        _kept.close()


@torch.no_grad()
def kl_to_reference(
    model: Any, reference: Any, tokenizer: Any, prompts: list[Messages], answers: list[list[int]], batch_size: int
) -> float:
    """Mean over answers of sum_t KL(model(.|x, y<t) || reference(.|x, y<t)): exact per-token KL
    on the model's own greedy answers, in nats per answer."""
    total = 0.0
    for start in range(0, len(prompts), batch_size):
        enc = _encode(tokenizer, prompts[start : start + batch_size])
        chunk = answers[start : start + batch_size]
        width = max(len(a) for a in chunk) or 1
        pad = tokenizer.pad_token_id
        resp = torch.tensor([a + [pad] * (width - len(a)) for a in chunk])
        resp_mask = torch.tensor([[1] * len(a) + [0] * (width - len(a)) for a in chunk])
        ids = torch.cat([enc["input_ids"], resp], dim=1).to(model.device)
        mask = torch.cat([enc["attention_mask"], resp_mask], dim=1).to(model.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        p_len = enc["input_ids"].shape[1]
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask, position_ids=positions).logits.float(), -1)
        logq = torch.log_softmax(
            reference(input_ids=ids, attention_mask=mask, position_ids=positions).logits.float(), -1
        )
        sl = slice(p_len - 1, ids.shape[1] - 1)
        kl = (logp[:, sl].exp() * (logp[:, sl] - logq[:, sl])).sum(-1) * resp_mask.to(model.device)
        total += float(kl.sum())
    return total / len(prompts)


def criteria_prompts(spec: cr.Criteria, held_out: list[str]) -> tuple[list[Messages], list[Messages]]:
    held = [_messages(p, spec.generation) for p in held_out]
    return held, [_messages(p.prompt, spec.generation) for p in spec.probes.items]


def answer(
    model: Any, tokenizer: Any, spec: cr.Criteria, held_out: list[str], *, engine: VllmGenerator | None = None
) -> tuple[list[Answer], list[Answer]]:
    """Greedy answers to `held_out` and to every probe of `spec`, in one batched pass: by
    `engine` when given (`model` is then not used), else by `model` with transformers."""
    held, probes = criteria_prompts(spec, held_out)
    if engine is not None:
        answers = generate_vllm(engine, tokenizer, held + probes, spec.generation)
    else:
        answers = generate(model, tokenizer, held + probes, spec.generation)
    return answers[: len(held)], answers[len(held) :]


def evaluate(
    model_dir: Path | str,
    criteria: cr.Criteria | Path | str,
    *,
    reward_func: RewardFunc | None = None,
    reference_dir: Path | str | None = None,
) -> dict[str, Any]:
    """Answers and measurements of `model_dir` on `criteria` (a JSON-able dict).

    `reward_func` scores the held-out answers (for the win rate), `reference_dir` is the
    model to measure KL against (the parent).
    """
    started = time.monotonic()
    spec = criteria if isinstance(criteria, cr.Criteria) else cr.load_criteria(Path(criteria))
    tokenizer = load_tokenizer(Path(model_dir), padding_side="left")
    engine_name = choose_engine(spec.generation, model_dir)
    model = None
    if engine_name == "vllm":
        held, probes = criteria_prompts(spec, spec.held_out_prompts)
        with contextlib.nullcontext(_kept) if _kept is not None else keep_engine() as keeper:
            engine = keeper.engine(model_dir, tokenizer, held + probes, spec.generation)
            keeper.load(model_dir, changed=False)
            held_answers, probe_answers = answer(None, tokenizer, spec, spec.held_out_prompts, engine=engine)
    else:
        model = load_policy(Path(model_dir)).eval()
        held_answers, probe_answers = answer(model, tokenizer, spec, spec.held_out_prompts)
    held = [_messages(p, spec.generation) for p in spec.held_out_prompts]
    texts = [a for a, _ in held_answers]

    rewards: list[float | None] = [None] * len(texts)
    if reward_func is not None:
        rewards = [float(r) for r in reward_func(held, texts)]

    kl = None
    if reference_dir is not None:
        # Loaded after vLLM has stopped (unless a retrain keeps its engine for the next evaluation).
        model = model if model is not None else load_policy(Path(model_dir)).eval()
        reference = load_policy(Path(reference_dir)).eval()
        kl = kl_to_reference(model, reference, tokenizer, held, [ids for _, ids in held_answers], spec.generation.batch_size)
        del reference

    lengths = [len(ids) for _, ids in held_answers]
    probe_rows = [
        {"prompt": p.prompt, "expect": p.expect, "output": a, "passed": cr.probe_passes(p, a)}
        for p, (a, _) in zip(spec.probes.items, probe_answers, strict=True)
    ]
    return {
        "model": str(model_dir),
        "held_out": [
            {"prompt": p, "output": a, "tokens": n, "reward": r}
            for p, a, n, r in zip(spec.held_out_prompts, texts, lengths, rewards, strict=True)
        ],
        "probes": probe_rows,
        "behaviour": {c.name: cr.pass_rate(c, texts) for c in spec.behaviour},
        "degeneration": cr.degeneration_stats(texts + [a for a, _ in probe_answers], spec.degeneration),
        "mean_length_tokens": sum(lengths) / len(lengths),
        "reward_mean": sum(rewards) / len(rewards) if reward_func is not None else None,  # type: ignore[arg-type]
        "kl_to_reference": kl,
        "probe_pass_rate": sum(p["passed"] for p in probe_rows) / len(probe_rows) if probe_rows else None,
        "engine": engine_name,
        "seconds": round(time.monotonic() - started, 2),
    }
