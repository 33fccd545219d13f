"""Greedy answers through vLLM's offline engine, for evaluation and the hacking watch.

vLLM runs in fp32 here: on a CPU its fp32 greedy answers are transformers' fp32 greedy
answers, token for token, which evaluation needs (answers feed the criteria checks and the
KL to the parent). This process keeps only vLLM's front end (tokens in, tokens out); the
model runs in processes vLLM spawns, so they start clean of this process's torch threads
and distributed state. `spawn` re-imports the main module: the process that starts an
engine must guard its entry point with `if __name__ == "__main__":` (the `tuneloop`
command and pytest do).

An engine is started for one model shape and keeps running: `load_weights` replaces its
weights in place from a folder (the hacking watch reloads the live model before every
measurement), which takes a fraction of a second where a start takes tens of seconds.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# KV cache bounds: vLLM needs room for one sequence of max_model_len; beyond what every
# answer of a call needs at once, more memory buys nothing.
_KV_CAP_BYTES = 1 << 30
_KV_FLOOR_BYTES = 16 << 20
KV_BLOCK_SLACK = 128  # slack per sequence for vLLM's partially filled cache blocks
CACHE_DIR = Path(".tuneloop/cache/vllm")


class VllmUnavailable(RuntimeError):
    """vLLM cannot generate for this model here (the reason is the message)."""


def _config(model_dir: Path) -> dict[str, Any]:
    return json.loads((Path(model_dir) / "config.json").read_text())


def unusable_reason(model_dir: Path | str) -> str | None:
    """Why vLLM cannot answer greedily with `model_dir` in this process; None when it can."""
    model_dir = Path(model_dir)
    if importlib.util.find_spec("vllm") is None:
        return "vllm is not installed"
    if (model_dir / "adapter_config.json").is_file() or not (model_dir / "config.json").is_file():
        return f"{model_dir} is not a full model folder (an adapter or no config.json)"
    # Importing vLLM's platform is cheap next to an engine start and is what decides.
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return None
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    config = _config(model_dir)
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    supported = CPUAttentionBackend.get_supported_head_sizes()
    if head_dim not in supported:
        return f"head size {head_dim} is not supported by vLLM's CPU attention (supported: {supported})"
    return None


def parameter_count(model_dir: Path | str) -> int:
    """Parameters in the model's safetensors files, from their headers (no weights read)."""
    from safetensors import safe_open

    total = 0
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                shape = f.get_slice(name).get_shape()
                count = 1
                for dim in shape:
                    count *= dim
                total += count
    return total


def kv_cache_bytes(model_dir: Path | str, kv_tokens: int, max_model_len: int) -> int:
    """KV cache for `kv_tokens` tokens at once (fp32), within 16 MiB-1 GiB, and never less
    than one sequence of `max_model_len`, which vLLM refuses to start without."""
    config = _config(Path(model_dir))
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    kv_heads = config.get("num_key_value_heads") or heads
    per_token = 2 * config["num_hidden_layers"] * kv_heads * head_dim * 4  # keys and values, fp32
    kv = min(max(per_token * kv_tokens, _KV_FLOOR_BYTES), _KV_CAP_BYTES)
    return max(kv, per_token * (max_model_len + KV_BLOCK_SLACK))


@contextlib.contextmanager
def vllm_environment(cache_dir: Path = CACHE_DIR) -> Iterator[None]:
    """Settings vLLM reads at import and passes to the processes it spawns; TMPDIR is put
    back afterwards so the rest of this process keeps its own."""
    cache_dir = cache_dir.resolve()
    (cache_dir / "tmp").mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("VLLM_CACHE_ROOT", str(cache_dir))
    # By default vLLM's CPU worker keeps a core for itself and computes with one thread; on
    # a small machine using every core gives 1.6-1.8x the throughput.
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    # This process has threads (and torch's): a forked child would inherit their locks.
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    saved = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(cache_dir / "tmp")
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = saved


def _shutdown(llm: Any) -> None:
    with contextlib.suppress(Exception):
        llm.llm_engine.engine_core.shutdown()


class VllmGenerator:
    """One vLLM engine (fp32, eager) answering greedily from prompt token ids.

    `max_model_len` bounds prompt plus answer; `kv_tokens` is how many tokens the KV cache
    should hold (all the answers of one call at once), within 16 MiB-1 GiB.
    """

    def __init__(self, model_dir: Path | str, *, max_model_len: int, kv_tokens: int,
                 cache_dir: Path = CACHE_DIR) -> None:
        reason = unusable_reason(model_dir)
        if reason is not None:
            raise VllmUnavailable(reason)
        from tuneloop.common.vllm_worker import WeightSwapExtension
        from vllm import LLM

        config = _config(Path(model_dir))
        limit = config.get("max_position_embeddings")
        self.max_model_len = min(max_model_len, limit) if limit else max_model_len
        kv = kv_cache_bytes(model_dir, kv_tokens, self.max_model_len)
        started = time.monotonic()
        with vllm_environment(cache_dir):
            self._llm = LLM(
                model=str(model_dir),
                dtype="float32",
                # torch.compile adds a minute to the start for a few percent of speed on a CPU.
                enforce_eager=True,
                max_model_len=self.max_model_len,
                kv_cache_memory_bytes=kv,
                # A prefix shared by every prompt (system prompt, chat template) is computed once.
                enable_prefix_caching=True,
                disable_log_stats=True,
                # Reloads a tied output head too, which reload_weights alone leaves stale on a CPU.
                worker_extension_cls=f"{WeightSwapExtension.__module__}.{WeightSwapExtension.__qualname__}",
            )
        # The engine's processes go with this object, or at exit when it lives that long.
        self._finalizer = weakref.finalize(self, _shutdown, self._llm)
        self.start_seconds = round(time.monotonic() - started, 2)
        log.info("vLLM engine for %s started in %.1f s (KV cache %d MiB)", model_dir, self.start_seconds, kv >> 20)

    def generate(self, prompts: list[list[int]], max_new_tokens: int, eos_token_id: int | None) -> list[list[int]]:
        """Greedy answer token ids per prompt, ending at `eos_token_id` (included) or after
        `max_new_tokens`. Only that eos stops an answer, as in transformers `generate` given
        it: vLLM by itself would also stop at every eos id of the model's generation config."""
        from vllm import SamplingParams

        requests, params = [], []
        for ids in prompts:
            room = self.max_model_len - len(ids)
            if room < 1:
                raise ValueError(f"a prompt of {len(ids)} tokens leaves no room under max_model_len {self.max_model_len}")
            requests.append({"prompt_token_ids": list(ids)})
            params.append(SamplingParams(
                temperature=0.0,
                max_tokens=min(max_new_tokens, room),
                ignore_eos=True,
                stop_token_ids=[eos_token_id] if eos_token_id is not None else None,
                detokenize=False,
            ))
        outputs = self._llm.generate(requests, params, use_tqdm=False)
        return [list(out.outputs[0].token_ids) for out in outputs]

    def load_weights(self, weights_dir: Path | str) -> None:
        """Replace the engine's weights with those in `weights_dir` (same architecture and shapes)."""
        self._llm.collective_rpc("swap_weights", kwargs={"weights_path": str(weights_dir)})
        # Cached prefixes were computed with the old weights.
        self._llm.reset_prefix_cache()

    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> VllmGenerator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
