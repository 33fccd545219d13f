"""Replay against forgetting: the parent's own answers to general prompts, kept by an NLL term.

DPO's loss only speaks of the preference pairs' prompts; what the policy answers elsewhere
is free to drift, and on SmolLM2 a natural preference taught with plain DPO turned "The
capital of France is Paris." into French prose. Replay anchors the rest: the parent answers
a set of general prompts once, greedily, before training, and every micro-step adds

    replay.weight x mean token NLL of the policy on (replay prompt, parent's answer)

for a seeded draw of `replay.batch_size` of them, beside the preference loss. The answers
are the parent's, not a reference text, so the term asks the policy to keep saying what it
said, whatever that was, and costs nothing where the policy has not moved.

The answers are written to `output_dir/replay_answers.jsonl` by the main process (the
others read that file), so a resumed run trains on the same answers; the draws follow the
seed, the process and the step, so a resumed run draws what the uninterrupted one would.

The criteria's held-out prompts and probes judge what the training did not see: a replay
prompt equal to one of them would train on the test, and is refused.
"""

from __future__ import annotations

import contextlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneloop.common.durable import write_atomic
from tuneloop.trainer.config import ConfigError, ReplayParams
from tuneloop.trainer.data import Messages, prompt_rows
from tuneloop.trainer.distributed import on_main

ANSWERS_FILE = "replay_answers.jsonl"
METRIC = "replay_nll"
FIELD = "replay.prompts"
GENERATE_BATCH = 16  # prompts per generate call while the parent answers


def _normalised(text: str) -> str:
    return " ".join(text.split()).casefold()


def criteria_prompts(criteria: Path) -> set[str]:
    """The held-out prompts and probe questions of a criteria file, normalised."""
    from tuneloop.trainer import criteria as cr

    spec = cr.load_criteria(criteria)
    return {_normalised(p) for p in spec.held_out_prompts} | {_normalised(p.prompt) for p in spec.probes.items}


def check_held_out(prompts: list[Messages], criteria: Path | None) -> None:
    """Refuses replay prompts that are also the criteria's (held-out prompts or probes): the
    criteria would then judge what was trained on. Compared without case or spacing."""
    if criteria is None:
        return
    held = criteria_prompts(criteria)
    for row, messages in enumerate(prompts, 1):
        for message in messages:
            if message["role"] != "system" and _normalised(message["content"]) in held:
                raise ConfigError(
                    f"{FIELD}: row {row} ({message['content']!r}) is a held-out prompt or probe of the criteria "
                    f"file {criteria}; those stay out of training — remove it from the replay prompts"
                )


def replay_prompts(params: ReplayParams, criteria: Path | None) -> list[Messages] | None:
    """The replay prompts (None when replay is off), checked against the criteria file."""
    if params.prompts is None:
        return None
    if not Path(params.prompts).is_file():
        raise ConfigError(f"{FIELD}: {params.prompts} does not exist")
    prompts = prompt_rows(params.prompts)
    if not prompts:
        raise ConfigError(f"{FIELD}: {params.prompts} holds no prompts")
    check_held_out(prompts, criteria)
    return prompts


def check_replay(params: Any, criteria: Path | None) -> None:
    """For a pipeline that knows its criteria before training: fails at start rather than at
    the training step. `params` is a DPOParams (anything with `replay`)."""
    replay = getattr(params, "replay", None)
    if replay is not None:
        replay_prompts(replay, criteria)


# ---- the parent's answers ----------------------------------------------------------------


def prompt_ids(tokenizer: Any, messages: Messages) -> list[int]:
    """A prompt's token ids as the policy sees it: its chat template with the assistant's turn
    opened (the tokenizer's own special tokens only without a template)."""
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer("\n".join(m["content"] for m in messages))["input_ids"])


def greedy_answers(model: Any, tokenizer: Any, prompts: list[Messages], max_new_tokens: int) -> list[list[int]]:
    """Each prompt's greedy answer as token ids, ending at (and with) the first eos when the
    answer ends before `max_new_tokens`."""
    import torch

    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[list[int]] = []
    try:
        with torch.no_grad():
            for start in range(0, len(prompts), GENERATE_BATCH):
                rows = [prompt_ids(tokenizer, p) for p in prompts[start : start + GENERATE_BATCH]]
                width = max(map(len, rows))
                # Left padding: every row's answer starts at the same column.
                ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
                mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
                generated = model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    do_sample=False,
                    max_new_tokens=max_new_tokens,
                    pad_token_id=pad,
                    eos_token_id=eos,
                )
                for row in generated[:, width:].tolist():
                    out.append(row[: row.index(eos) + 1] if eos in row else row)
    finally:
        model.train(was_training)
    return out


def _write_answers(path: Path, params: ReplayParams, prompts: list[Messages], model: Any, tokenizer: Any) -> None:
    answers = greedy_answers(model, tokenizer, prompts, params.max_new_tokens)
    lines = [
        json.dumps({
            "prompt": messages,
            "answer": tokenizer.decode(ids, skip_special_tokens=True),
            "answer_ids": ids,
            "max_new_tokens": params.max_new_tokens,
        })
        for messages, ids in zip(prompts, answers, strict=True)
    ]  # fmt: skip
    write_atomic(path, ("\n".join(lines) + "\n").encode())


def read_answers(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def parent_answers(
    params: ReplayParams, prompts: list[Messages], model: Any, tokenizer: Any, output_dir: Path
) -> list[dict[str, Any]]:
    """The parent's answers to `prompts`: made once by the main process into
    output_dir/replay_answers.jsonl, read back by every process (and by a resumed run).

    Call it before training, with `model` still the parent, in every process: the others wait
    for the main one's file."""
    path = Path(output_dir) / ANSWERS_FILE

    def make() -> None:
        if not path.exists():
            _write_answers(path, params, prompts, model, tokenizer)

    on_main(make)
    rows = read_answers(path)
    if [r["prompt"] for r in rows] != prompts or any(r["max_new_tokens"] != params.max_new_tokens for r in rows):
        # A resumed run must train on what it started with; another prompt set means another run.
        raise ConfigError(
            f"{FIELD}: {path} holds the parent's answers to other prompts or another replay.max_new_tokens "
            "than this config's; resume with the config the run started with, or choose a new output_dir"
        )
    return rows


# ---- the loss term -----------------------------------------------------------------------


@dataclass(frozen=True)
class ReplaySet:
    """Tokenised (prompt, parent's answer) rows and how the loss term draws and weighs them."""

    examples: list[tuple[list[int], int]]  # (prompt + answer token ids, prompt length)
    weight: float
    batch_size: int
    pad_token_id: int

    @classmethod
    def of(cls, params: ReplayParams, rows: list[dict[str, Any]], tokenizer: Any, max_length: int) -> ReplaySet:
        examples = []
        for row in rows:
            prompt = prompt_ids(tokenizer, row["prompt"])
            # Cut from the end as DPO does: the answer's opening is what forgetting changes first.
            examples.append(((prompt + list(row["answer_ids"]))[:max_length], min(len(prompt), max_length)))
        return cls(examples, params.weight, params.batch_size, tokenizer.pad_token_id)

    def draw(self, seed: int, process: int, step: int, micro: int) -> list[int]:
        """Row indices of one micro-step: a function of its coordinates only, so a resumed run
        draws what the uninterrupted one would, and processes draw different rows."""
        rng = random.Random(f"{seed}/{process}/{step}/{micro}")
        n = len(self.examples)
        return rng.sample(range(n), min(self.batch_size, n))

    def batch(self, indices: list[int], device: Any) -> dict[str, Any]:
        """Right-padded inputs, the loss on the answer tokens only."""
        import torch

        rows = [self.examples[i] for i in indices]
        width = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        for i, (ids, prompt_len) in enumerate(rows):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            attention_mask[i, : len(ids)] = 1
            labels[i, prompt_len : len(ids)] = torch.tensor(ids[prompt_len:], dtype=torch.long)
        return {name: t.to(device) for name, t in
                (("input_ids", input_ids), ("attention_mask", attention_mask), ("labels", labels))}  # fmt: skip


class ReplayLoss:
    """Mixin for TRL's DPOTrainer (or a subclass of it, e.g. `weighted(DPOTrainer)`): adds
    `replay.weight` x the replay NLL to each micro-step's loss and logs it as `replay_nll`
    beside DPO's metrics. Built with `replay=None` it is DPOTrainer unchanged."""

    def __init__(self, *args: Any, replay: ReplaySet | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.replay = replay
        self._replay_at = (-1, 0)  # (global step, micro-steps drawn in it)

    def compute_loss(
        self, model: Any, inputs: Any, return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        out = super().compute_loss(  # type: ignore[misc]
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        if self.replay is None:
            return out
        loss, outputs = out if return_outputs else (out, None)
        nll = self._replay_nll(model)
        if self.replay.weight:
            loss = loss + self.replay.weight * nll
        mode = "train" if self.model.training else "eval"  # type: ignore[attr-defined]
        gathered = self.accelerator.gather_for_metrics(nll.detach())  # type: ignore[attr-defined]
        self._metrics[mode][METRIC].append(gathered.float().mean().item())  # type: ignore[attr-defined]
        return (loss, outputs) if return_outputs else loss

    def _replay_nll(self, model: Any) -> Any:
        import torch

        assert self.replay is not None
        step = self.state.global_step  # type: ignore[attr-defined]
        micro = self._replay_at[1] if self._replay_at[0] == step else 0
        self._replay_at = (step, micro + 1)
        args = self.args  # type: ignore[attr-defined]
        indices = self.replay.draw(args.seed, self.accelerator.process_index, step, micro)  # type: ignore[attr-defined]
        batch = self.replay.batch(indices, self.accelerator.device)  # type: ignore[attr-defined]
        # Weight 0 measures only: no graph, no gradient.
        with contextlib.nullcontext() if self.replay.weight else torch.no_grad():
            # DPOTrainer gives the model a fused LM head: per-token log-probs of the labels
            # without the (batch, length, vocabulary) logits; its loss is their mean NLL.
            outputs = model(**batch, use_cache=False, fused_lm_head=True)
        return outputs.loss


def with_replay(trainer_cls: type) -> type:
    """`trainer_cls` (DPOTrainer or a subclass) taking `replay=ReplaySet` (or None)."""
    return type(f"Replay{trainer_cls.__name__}", (ReplayLoss, trainer_cls), {})
