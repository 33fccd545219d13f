"""vLLM (v1 AsyncLLM) behind the engine interface.

The gRPC server is synchronous (a thread pool), AsyncLLM is asyncio: the engine runs its own
event loop in one thread and every call crosses over with `run_coroutine_threadsafe`.
vLLM starts worker processes with `spawn`, so the process that creates the engine must
guard its entry point with `if __name__ == "__main__":` (the `tuneloop` command does).

Swap: new requests wait at a gate, requests in flight finish on the old weights, then the
scheduler is paused, `reload_weights` replaces the weights in place from the new folder
(through `WeightSwapExtension`, which also refreshes a tied output head),
the prefix cache (built from the old weights) is dropped, and the gate reopens. Weights
are replaced in place, so only versions of the same architecture and tokenizer can be
swapped in; any other is refused and the served version stays.

LoRA adapter versions are served with vLLM's LoRA support (`enable_lora`, one adapter at a
time): requests carry the served adapter's `LoRARequest`, and requests that name the base
carry none. vLLM is started with LoRA when the first version is an adapter (sized to its
rank) or when `vllm_max_lora_rank` is set; only then can adapters be swapped in. A swap to
an adapter goes through the same gate: the base weights are reloaded only when the new
adapter has another base than the weights in the engine, then the old adapter is removed
and the new one added. Without LoRA support, a swap to an adapter is refused.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import uuid
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneloop.common.vllm_worker import WeightSwapExtension
from tuneloop.generation import metrics
from tuneloop.generation.adapters import lora_rank
from tuneloop.generation.engines.base import (
    Delta,
    Engine,
    EngineError,
    EngineRequest,
    FinishReason,
    ModelRef,
    Stream,
    SwapError,
)
from tuneloop.generation.settings import VLLM_LORA_RANKS

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase
    from tuneloop.generation.settings import GenerationSettings

log = logging.getLogger(__name__)

_FINISH: dict[str, FinishReason] = {"stop": "stop", "length": "length", "abort": "aborted"}
# config.json keys that fix the shapes of the weights: reload_weights cannot change them.
_SHAPE_KEYS = (
    "architectures", "model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings",
)


def _shape(path: Path) -> dict[str, Any]:
    config = json.loads((path / "config.json").read_text())
    return {key: config.get(key) for key in _SHAPE_KEYS}


def _check_supported(path: Path) -> None:
    """Fail at start, not at the first request, on a model the CPU attention kernel lacks."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    config = json.loads((path / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    supported = CPUAttentionBackend.get_supported_head_sizes()
    if head_dim not in supported:
        raise EngineError(
            f"{path}: head_dim {head_dim} is not supported by vLLM's CPU attention (supported: {supported})"
        )


def _same(a: ModelRef, b: ModelRef) -> bool:
    return Path(a.path).resolve() == Path(b.path).resolve()


def _tokenizer_of(model: ModelRef) -> PreTrainedTokenizerBase:
    """An adapter folder's own tokenizer when it has one, else its base's (or the model's)."""
    from transformers import AutoTokenizer

    own = model.adapter and (Path(model.path) / "tokenizer_config.json").is_file()
    return AutoTokenizer.from_pretrained(model.path if own else model.weights.path)


def _lora_rank_for(model: ModelRef, configured: int) -> int:
    """vLLM's max_lora_rank for the first version: the setting, else (0) LoRA off for a full
    model and the smallest rank vLLM takes that fits an adapter."""
    if not model.adapter:
        return configured
    need = lora_rank(model)
    if configured:
        if need > configured:
            raise EngineError(
                f"{model.name}@{model.version} is a LoRA adapter of rank {need}, above vllm_max_lora_rank {configured}"
            )
        return configured
    fits = [r for r in VLLM_LORA_RANKS if r >= need]
    if not fits:
        raise EngineError(f"{model.name}@{model.version}: LoRA rank {need} is above what vLLM serves ({VLLM_LORA_RANKS[-1]})")
    return fits[0]


def _prepare_environment(cache_dir: Path) -> None:
    """Process-wide settings vLLM reads at import and when it spawns workers."""
    cache_dir = cache_dir.resolve()
    (cache_dir / "tmp").mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("VLLM_CACHE_ROOT", str(cache_dir))
    os.environ["TMPDIR"] = str(cache_dir / "tmp")
    # By default the CPU worker keeps a core for itself and computes with one thread; on a
    # small machine using every core gives 1.6-1.8x the throughput.
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    # The server has threads: forking it would copy locks held by other threads.
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")


class VllmEngine(Engine):
    name = "vllm"

    def __init__(self, settings: GenerationSettings) -> None:
        self._settings = settings
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vllm-loop", daemon=True)
        self._llm: Any = None
        self._ref: ModelRef | None = None
        self._weights: ModelRef | None = None  # the full model whose weights are in the engine
        self._lora: Any = None  # LoRARequest of the served adapter
        self._lora_ids = 0
        self._max_lora_rank = 0  # 0: vLLM runs without LoRA support
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self._max_len = 0
        # Created in the loop: asyncio primitives belong to the loop that uses them.
        self._gate: asyncio.Event
        self._idle: asyncio.Condition
        self._swap_lock: asyncio.Lock
        self._active = 0

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    # ---- Engine ----------------------------------------------------------------------
    def load(self, model: ModelRef) -> None:
        _prepare_environment(self._settings.vllm_cache_dir)
        _check_supported(model.weights.path)
        self._max_lora_rank = _lora_rank_for(model, self._settings.vllm_max_lora_rank)
        tokenizer = _tokenizer_of(model)
        if model.adapter:
            self._check_tokenizer(model, tokenizer, _tokenizer_of(model.weights))
        self._thread.start()
        self._call(self._create(model.weights))
        self._weights = model.weights
        if model.adapter:
            try:
                self._call(self._set_lora(model))
            except Exception as err:
                raise EngineError(f"vLLM cannot serve the LoRA adapter {model.name}@{model.version}: {err}") from err
        self._tokenizer = tokenizer
        self._ref = model

    @staticmethod
    def _check_tokenizer(
        model: ModelRef, tokenizer: PreTrainedTokenizerBase, served: PreTrainedTokenizerBase
    ) -> None:
        # vLLM decodes with the tokenizer of the weights it was started with.
        if tokenizer.get_vocab() != served.get_vocab():
            raise SwapError(f"{model.name}@{model.version} has another tokenizer than the served version")

    async def _create(self, model: ModelRef) -> None:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self._gate = asyncio.Event()
        self._gate.set()
        self._idle = asyncio.Condition()
        self._swap_lock = asyncio.Lock()
        s = self._settings
        args = AsyncEngineArgs(
            model=str(model.path),
            dtype=s.dtype,
            enforce_eager=s.vllm_enforce_eager,
            kv_cache_memory_bytes=s.vllm_kv_cache_bytes,
            max_model_len=s.max_model_len,
            max_num_seqs=s.vllm_max_num_seqs,
            disable_log_stats=True,
            worker_extension_cls=f"{WeightSwapExtension.__module__}.{WeightSwapExtension.__qualname__}",
            **(
                {"enable_lora": True, "max_lora_rank": self._max_lora_rank, "max_loras": 1}
                if self._max_lora_rank
                else {}
            ),
        )
        self._llm = AsyncLLM.from_engine_args(args)
        self._max_len = int(self._llm.model_config.max_model_len)

    @property
    def healthy(self) -> bool:
        return self._llm is not None and not self._llm.errored

    @property
    def model(self) -> ModelRef:
        if self._ref is None:
            raise EngineError("no model loaded")
        return self._ref

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        if self._tokenizer is None:
            raise EngineError("no model loaded")
        return self._tokenizer

    @property
    def max_model_len(self) -> int:
        return self._max_len

    def generate(self, request: EngineRequest) -> Stream:
        if self._llm is None:
            raise EngineError("no model loaded")
        stream = Stream(n=request.sampling.n)
        future: Future[None] = asyncio.run_coroutine_threadsafe(self._run(request, stream), self._loop)
        # Cancelling the task makes AsyncLLM.generate abort the request inside vLLM.
        stream.on_cancel(future.cancel)
        return stream

    def swap(self, model: ModelRef) -> None:
        current = self.model
        assert self._weights is not None
        if _shape(model.weights.path) != _shape(self._weights.path):
            raise SwapError(
                f"{model.name}@{model.version} has another architecture or shape than the served "
                f"{current.name}@{current.version}; in-place weight reload cannot switch to it"
            )
        if model.adapter:
            if not self._max_lora_rank:
                raise SwapError(
                    f"{model.name}@{model.version} is a LoRA adapter and vLLM was started without LoRA support: "
                    "set TUNELOOP_GENERATION_VLLM_MAX_LORA_RANK to serve adapter versions after a full model"
                )
            if (rank := lora_rank(model)) > self._max_lora_rank:
                raise SwapError(
                    f"{model.name}@{model.version} has LoRA rank {rank}; vLLM was started for at most "
                    f"{self._max_lora_rank} (TUNELOOP_GENERATION_VLLM_MAX_LORA_RANK)"
                )
        tokenizer = _tokenizer_of(model)
        self._check_tokenizer(model, tokenizer, self.tokenizer)
        self._call(self._swap(model, tokenizer))

    def close(self) -> None:
        if self._llm is not None:
            self._llm.shutdown()
            self._llm = None
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=30)

    # ---- inside the loop -------------------------------------------------------------
    async def _run(self, request: EngineRequest, stream: Stream) -> None:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        s = request.sampling
        done: set[int] = set()
        tokens = [0] * s.n
        admitted = False
        try:
            await self._gate.wait()
            self._active += 1
            admitted = True
            ref = self._ref
            assert ref is not None
            use_base = request.use_base and ref.base is not None
            stream.model = ref.base if use_base else ref
            lora = None if use_base else self._lora
            params = SamplingParams(
                n=s.n,
                temperature=s.temperature,
                top_p=s.top_p,
                max_tokens=min(s.max_tokens, self._max_len - len(request.prompt_ids)),
                stop=list(s.stop) or None,
                seed=s.seed,
                logprobs=0 if s.logprobs else None,
                output_kind=RequestOutputKind.DELTA,
                skip_special_tokens=True,
            )
            # A caller may reuse its request id; vLLM needs one unique among live requests.
            engine_id = f"{request.request_id}-{uuid.uuid4().hex[:8]}"
            prompt = {"prompt_token_ids": list(request.prompt_ids)}
            async for out in self._llm.generate(prompt, params, request_id=engine_id, lora_request=lora):
                for c in out.outputs:
                    new = len(c.token_ids)
                    tokens[c.index] += new
                    metrics.TOKENS_GENERATED.inc(new)
                    logprobs: tuple[tuple[str, float], ...] = ()
                    if s.logprobs and c.logprobs:
                        logprobs = tuple(
                            (self.tokenizer.decode([tid]), float(step[tid].logprob))
                            for tid, step in zip(c.token_ids, c.logprobs, strict=True)
                        )
                    reason = _FINISH.get(c.finish_reason) if c.finish_reason else None
                    if c.finish_reason and reason is None:
                        raise EngineError(f"vLLM finished a candidate with {c.finish_reason!r}")
                    if reason is not None:
                        done.add(c.index)
                    if c.text or logprobs or reason:
                        stream.push(Delta(c.index, c.text, tokens[c.index], logprobs, reason))
        except asyncio.CancelledError:
            if stream.model is None:  # cancelled while waiting at the swap gate
                stream.model = self._ref
            for index in range(s.n):
                if index not in done:
                    stream.push(Delta(index, "", tokens[index], (), "aborted"))
        except Exception as err:
            log.exception("vLLM generation failed")
            stream.fail(err)
        finally:
            stream.finish()
            if admitted:
                async with self._idle:
                    self._active -= 1
                    self._idle.notify_all()

    async def _swap(self, model: ModelRef, tokenizer: PreTrainedTokenizerBase) -> None:
        async with self._swap_lock:
            self._gate.clear()
            try:
                async with self._idle:
                    await self._idle.wait_for(lambda: self._active == 0)
                assert self._weights is not None
                served = self._weights
                reload = not _same(model.weights, served)
                if reload:
                    await self._reload_paused(model.weights.path, served.path)
                try:
                    await self._set_lora(model if model.adapter else None)
                except Exception as err:
                    if reload:
                        await self._reload_paused(served.path, model.weights.path)
                    raise SwapError(f"vLLM cannot load the LoRA adapter {model.name}@{model.version}: {err}") from err
                # Before the gate opens: the next request gets the new version and its adapter.
                self._weights, self._ref, self._tokenizer = model.weights, model, tokenizer
            finally:
                self._gate.set()

    async def _reload_paused(self, path: Path, served: Path) -> None:
        await self._llm.pause_generation(mode="wait", clear_cache=True)
        try:
            await self._reload(path, served)
        finally:
            await self._llm.resume_generation()

    async def _reload(self, path: Path, served: Path) -> None:
        try:
            await self._llm.collective_rpc("swap_weights", kwargs={"weights_path": str(path)})
        except Exception as err:
            # A reload that failed half-way leaves mixed weights: put the served ones back.
            await self._llm.collective_rpc("swap_weights", kwargs={"weights_path": str(served)})
            raise SwapError(f"reloading weights from {path} failed: {err}") from err
        finally:
            await self._llm.reset_prefix_cache()

    async def _set_lora(self, model: ModelRef | None) -> None:
        """Serve `model`'s adapter (None: no adapter) from the next request on; the served
        adapter stays when the new one cannot be loaded. No request may be in flight."""
        from vllm.lora.request import LoRARequest

        old = self._lora
        if old is not None:
            await self._llm.remove_lora(old.lora_int_id)
            self._lora = None
        if model is None:
            return
        self._lora_ids += 1
        # The name keys vLLM's prefix cache: one per version (its files never change).
        new = LoRARequest(f"{model.name}@{model.version}", self._lora_ids, str(model.path))
        try:
            if not await self._llm.add_lora(new):
                raise EngineError("vLLM did not add it")
        except Exception:
            if old is not None:
                await self._llm.add_lora(old)
                self._lora = old
            raise
        self._lora = new
