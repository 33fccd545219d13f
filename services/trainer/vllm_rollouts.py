"""RLOO and GRPO rollouts sampled by vLLM inside the training process (TRL's colocate mode).

TRL starts the engine in each training process (`distributed_executor_backend=
"external_launcher"`) and, before the first generation of every step, pushes the trained
weights into it. TRL passes vLLM no dtype, and vLLM's "auto" turns a float32 model into
bfloat16 on a CPU: the engine would sample from another distribution than the one the
trainer scores. So the engine is built here with the trainer's dtype (and eager: compiling
adds a minute to a CPU start), and a KV cache sized for the step's sequences. TRL 1.16 pushes with the model's `load_weights`, which on a CPU fails: a
linear layer there computes with a copy of its weight packed for oneDNN, and the packed
parameter has no loader. The push here goes through vLLM's in-place `reload_weights`
instead (which repacks each layer it loads, see `common.vllm_worker.swap_weights`), fed
with TRL's own iterator of the weights (adapters merged, sharded parameters gathered): no
file is written and nothing is read from disk.

After each push a short sample from vLLM, with its log-probabilities, is scored by the
trained model: the largest difference is logged as `rollout_logprob_gap` (nats) and a
difference above `MAX_LOGPROB_GAP` stops the run, since rollouts from weights other than
the trained ones (a push that did not land, another dtype) would train on the wrong
distribution.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tuneloop.common.vllm_worker import swap_weights
from tuneloop.trainer.config import ConfigError
from tuneloop.trainer.vllm_generator import unusable_reason, vllm_environment

log = logging.getLogger(__name__)

# fp32 vLLM against fp32 transformers on a CPU differ by ~1e-5 nats; bf16 against fp32, or
# one optimizer step of stale weights at a usual learning rate, by 1e-2 and more.
MAX_LOGPROB_GAP = 5e-3
PROBE_TOKENS = 8


def trl_rollout_args(model_dir: Path, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    """TRL config fields for rollouts from vLLM, or a ConfigError naming why vLLM cannot serve `model_dir`."""
    reason = unusable_reason(model_dir)
    if reason is not None:
        raise ConfigError(f"rollout_engine: vllm cannot sample from this model: {reason}")
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


class InPlacePush:
    """Replaces a TRL trainer's `vllm_generation.sync_weights` with the in-place push and check."""

    def __init__(self, trainer: Any, probe_prompt_ids: list[int]) -> None:
        self.trainer = trainer
        self.generation = trainer.vllm_generation
        self.model = trainer.model
        self.probe = probe_prompt_ids
        self.pushes = 0
        self.gaps: list[float] = []
        self.generation.sync_weights = self.push

    def push(self) -> None:
        llm = self.generation.llm
        # TRL's iterator, consumed while vLLM loads: with LoRA it yields merged weights and
        # unmerges when exhausted, so the tensors must be read before it ends.
        llm.collective_rpc(swap_weights, kwargs={"weights": self.generation._iter_named_params()})
        llm.reset_prefix_cache()  # cached prefixes were computed with the old weights
        self.pushes += 1
        gap = self.logprob_gap()
        self.gaps.append(gap)
        # The trainer's own step metrics: averaged into the step's logged row.
        self.trainer._metrics["train"]["rollout_logprob_gap"].append(gap)
        if gap > MAX_LOGPROB_GAP:
            raise RuntimeError(
                f"vLLM's log-probabilities differ from the trained model's by {gap:.4f} nats after a weight push "
                f"(at most {MAX_LOGPROB_GAP}): its rollouts would not come from the trained weights"
            )

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
        engine = torch.tensor([step[token].logprob for step, token in zip(out.logprobs, tokens, strict=True)])
        model = self.model
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
