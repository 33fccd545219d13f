"""Online-RL rollouts sampled by vLLM inside the training process.

Each training process holds its own engine (`distributed_executor_backend=
"external_launcher"`): TRL's colocate mode for RLOO and GRPO, `RolloutEngine` for PPO.
Before a step samples, the trained weights are pushed into the engine in place through
vLLM's `reload_weights` (`common.vllm_worker.swap_weights`, which repacks each layer it
loads): no file is written and nothing is read from disk. TRL 1.16 pushes with the model's
`load_weights`, which on a CPU fails (a linear layer there computes with a copy of its
weight packed for oneDNN, and the packed parameter has no loader), so its push is replaced.

TRL passes vLLM no dtype, and vLLM's "auto" turns a float32 model into bfloat16 on a CPU:
the engine would sample from another distribution than the one the trainer scores. Engines
here are built with the trainer's dtype, eager (compiling adds a minute to a CPU start), and
a KV cache sized for a step's sequences.

The log-probabilities vLLM gives for what it sampled are compared with the trained model's
(PPO: every sampled token, from the pass it makes anyway; RLOO/GRPO: a short probe sample
after each push): the largest difference is logged as `rollout_logprob_gap` (nats), and
one above `max_rollout_logprob_gap` stops the run, since rollouts from weights other than
the trained ones (a push that did not land, another dtype) would train on the wrong
distribution.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from tuneloop.common.local_kafka import free_port
from tuneloop.common.vllm_worker import swap_weights
from tuneloop.trainer.config import ConfigError
from tuneloop.trainer.vllm_generator import (
    kv_cache_bytes,
    unusable_reason,
    vllm_environment,
)

log = logging.getLogger(__name__)

PROBE_TOKENS = 8


def require_vllm(model_dir: Path) -> None:
    reason = unusable_reason(model_dir)
    if reason is not None:
        raise ConfigError(f"rollout_engine: vllm cannot sample from this model: {reason}")


def trl_rollout_args(model_dir: Path, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    """TRL config fields for rollouts from vLLM, or a ConfigError naming why vLLM cannot serve `model_dir`."""
    require_vllm(model_dir)
    return {
        "use_vllm": True,
        "vllm_mode": "colocate",
        # Room for the longest prompt and a full completion; vLLM sizes its cache by this.
        "vllm_max_model_length": prompt_tokens + completion_tokens,
    }


@contextlib.contextmanager
def engine_options(dtype: str, kv_bytes: int) -> Iterator[None]:
    """Around building the TRL trainer, which starts the engine: vLLM's settings and the
    engine arguments TRL does not pass."""
    from trl.generation import vllm_generation

    built_by_trl = vllm_generation.LLM
    # Left to gpu_memory_utilization, a CPU engine's cache would take a share of the machine.
    vllm_generation.LLM = functools.partial(
        built_by_trl, dtype=dtype, enforce_eager=True, kv_cache_memory_bytes=kv_bytes
    )
    try:
        with vllm_environment():
            yield
    finally:
        vllm_generation.LLM = built_by_trl


def push_weights(llm: Any, weights: Iterable[tuple[str, Any]]) -> None:
    """The (name, tensor) pairs into the engine's model, in place; `weights` is read while loading."""
    llm.collective_rpc(swap_weights, kwargs={"weights": weights})
    llm.reset_prefix_cache()  # cached prefixes were computed with the old weights


def check_gap(gap: float, limit: float | None) -> None:
    if limit is not None and gap > limit:
        raise RuntimeError(
            f"vLLM's log-probabilities differ from the trained model's by {gap:.4f} nats after a weight push "
            f"(max_rollout_logprob_gap {limit}): its rollouts would not come from the trained weights"
        )


class InPlacePush:
    """Replaces a TRL trainer's `vllm_generation.sync_weights` with the in-place push and check."""

    def __init__(self, trainer: Any, probe_prompt_ids: list[int], limit: float | None) -> None:
        self.trainer = trainer
        self.generation = trainer.vllm_generation
        self.probe = probe_prompt_ids
        self.limit = limit
        self.generation.sync_weights = self.push

    def push(self) -> None:
        # TRL's iterator (adapters merged, sharded parameters gathered), consumed while vLLM
        # loads: with LoRA it unmerges when exhausted.
        push_weights(self.generation.llm, self.generation._iter_named_params())
        gap = self.logprob_gap()
        # The trainer's own step metrics: averaged into the step's logged row.
        self.trainer._metrics["train"]["rollout_logprob_gap"].append(gap)
        check_gap(gap, self.limit)

    def logprob_gap(self) -> float:
        """Largest |log p_vLLM - log p_model| over the tokens of a short sample from vLLM."""
        import torch
        from vllm import SamplingParams

        out = self.generation.llm.generate(
            [{"prompt_token_ids": self.probe}],
            SamplingParams(max_tokens=PROBE_TOKENS, temperature=1.0, logprobs=0, seed=0, detokenize=False),
            use_tqdm=False,
        )[0].outputs[0]
        tokens = list(out.token_ids)
        engine = torch.tensor(sampled_logprobs(out))
        model = self.trainer.model
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                ids = torch.tensor([self.probe + tokens], device=next(model.parameters()).device)
                logits = model(input_ids=ids).logits[0, len(self.probe) - 1 : -1].float()
        finally:
            model.train(was_training)
        trained = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(tokens, device=logits.device)[:, None])[:, 0]
        return float((engine - trained.cpu()).abs().max())


def sampled_logprobs(completion: Any) -> list[float]:
    """log p of each token of a vLLM completion asked for with logprobs=0."""
    return [step[token].logprob for step, token in zip(completion.logprobs, completion.token_ids, strict=True)]


class RolloutEngine:
    """A vLLM engine in this process that samples PPO's rollouts, each row from its own seed."""

    def __init__(self, model_dir: Path, *, dtype: str, max_model_len: int, sequences: int) -> None:
        require_vllm(model_dir)
        from vllm import LLM

        # external_launcher joins the launcher's processes; one process alone is a group of one.
        for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
            os.environ.setdefault(name, value)
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        started = time.monotonic()
        with vllm_environment():
            self.llm = LLM(
                model=str(model_dir),
                dtype=dtype,
                enforce_eager=True,
                max_model_len=max_model_len,
                kv_cache_memory_bytes=kv_cache_bytes(model_dir, sequences * max_model_len, max_model_len),
                distributed_executor_backend="external_launcher",
                # Log-probabilities after temperature: those of the distribution sampled from.
                logprobs_mode="processed_logprobs",
                # Sampling settings come from the trainer only, never from generation_config.json.
                generation_config="vllm",
                enable_prefix_caching=True,
                disable_log_stats=True,
            )
        log.info("rollout engine for %s started in %.1f s", model_dir, time.monotonic() - started)

    def push(self, weights: Iterable[tuple[str, Any]]) -> None:
        push_weights(self.llm, weights)

    def sample(
        self,
        prompts: list[list[int]],
        seeds: list[int],
        temperature: float,
        max_tokens: int,
        stop_ids: set[int],
        *,
        ignore_eos: bool = False,
    ) -> list[tuple[list[int], list[float]]]:
        """(token ids, their log-probabilities) per prompt: softmax(logits / temperature), nothing else;
        every response runs to `max_tokens` with `ignore_eos` and no `stop_ids` (benchmarks)."""
        from vllm import SamplingParams

        params = [
            SamplingParams(temperature=temperature, top_p=1.0, top_k=0, seed=seed, max_tokens=max_tokens,
                           stop_token_ids=sorted(stop_ids), ignore_eos=ignore_eos, logprobs=0, detokenize=False)
            for seed in seeds
        ]  # fmt: skip
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompts], params, use_tqdm=False)
        return [(list(out.outputs[0].token_ids), sampled_logprobs(out.outputs[0])) for out in outputs]
