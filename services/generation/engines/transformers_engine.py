"""transformers on the CPU with continuous batching.

One scheduler thread owns the model. Requests that arrive within `batch_window_ms` of the
first waiting one (up to `max_batch_size` candidates) start together: prompts are
left-padded, then a manual decode loop with a KV cache takes one step for every live
candidate at a time. Each candidate stops on its own (end-of-sequence, stop string, token
budget, cancellation) and is pruned from the batch, so a short answer does not wait for a
long one and streamed deltas leave after every step. Requests that arrive while a batch runs
join it between two steps while there is room: their prompts are prefilled on their own,
and their KV cache is left-padded to the batch's length and stacked onto it.

transformers' own `ContinuousBatchingManager` is not used: it has one random generator for
all requests (a seeded request's answer would depend on its neighbours), no per-row LoRA
adapter (`use_base`), and no way to finish a batch on one version while the next one loads;
and on the CPU (its paged eager attention; paged SDPA is not offered) `generate_batch` of 16
SmolLM2 prompts ran at 22-32 tokens/s where one `generate` call on them ran at 113-115.

A swap loads the new version beside the old one in the caller's thread and replaces the
reference the scheduler reads when it forms the next batch: a batch in progress finishes on
the version it started with, and no request ever sees two versions.

LoRA adapter versions (peft) are applied onto their base model in place. When the base is
the one already in memory (the served full model, or the base of the served adapter), the
base is not loaded again: the scheduler thread, between two batches, adds the new adapter
to the live model and drops the old one (or removes the adapter layers when the base itself
becomes the served version), so a batch never sees its model change. Only one adapter is
kept in memory. A request may ask for the adapter's base (`use_base`): its rows of a batch
run with the adapter off (peft's per-row `adapter_names`).
"""

from __future__ import annotations

import logging
import re
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tuneloop.generation import metrics
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
from tuneloop.generation.engines.text import TextTracker

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from tuneloop.generation.settings import GenerationSettings

log = logging.getLogger(__name__)

_BASE_ROW = "__base__"  # peft's adapter name for rows computed without any adapter


@dataclass
class _Weights:
    """A full model in memory. LoRA layers are added onto its modules in place (`peft`), and
    only the scheduler thread changes them, between batches."""

    ref: ModelRef  # the full model version these weights are
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    eos_ids: frozenset[int]
    pad_id: int
    max_len: int
    peft: PeftModel | None = None  # set while an adapter is applied


@dataclass(frozen=True)
class _Bundle:
    """The served version: a full model, or an adapter (`adapter`: its peft name) on `weights`."""

    ref: ModelRef
    weights: _Weights
    tokenizer: PreTrainedTokenizerBase
    adapter: str | None = None

    @property
    def eos_ids(self) -> frozenset[int]:
        return self.weights.eos_ids

    @property
    def pad_id(self) -> int:
        return self.weights.pad_id

    @property
    def max_len(self) -> int:
        return self.weights.max_len

    def forward(self, rows: list[_Candidate], **kwargs: Any) -> Any:
        if self.adapter is None:
            return self.weights.model(**kwargs)
        assert self.weights.peft is not None
        if any(c.request.use_base for c in rows):
            kwargs["adapter_names"] = [_BASE_ROW if c.request.use_base else self.adapter for c in rows]
        return self.weights.peft(**kwargs)


@dataclass
class _Pending:
    request: EngineRequest
    stream: Stream
    queued_at: float = field(default_factory=time.monotonic)


@dataclass
class _Started:
    """A request in a running batch: its stream finishes with its last candidate."""

    pending: _Pending
    unfinished: int

    def candidate_done(self) -> None:
        self.unfinished -= 1
        if self.unfinished == 0:
            self.pending.stream.finish()


@dataclass
class _Candidate:
    """One sequence of a batch."""

    started: _Started
    index: int
    generator: torch.Generator | None
    text: TextTracker
    budget: int
    tokens: int = 0
    finished: bool = False

    @property
    def stream(self) -> Stream:
        return self.started.pending.stream

    @property
    def request(self) -> EngineRequest:
        return self.started.pending.request


@dataclass
class _Rows:
    """The live sequences of a batch and their KV cache: the cache holds `mask.shape[1]`
    positions per row, left-padded where `mask` is 0."""

    cands: list[_Candidate]
    cache: Any  # transformers DynamicCache
    mask: torch.Tensor
    last_pos: torch.Tensor  # per row, the position of its newest token
    logits: torch.Tensor  # per row, the next token's logits

    def select(self, keep: list[int]) -> None:
        index = torch.tensor(keep, dtype=torch.long)
        self.cache.batch_select_indices(index)
        self.mask, self.last_pos, self.logits = self.mask[index], self.last_pos[index], self.logits[index]
        self.cands = [self.cands[row] for row in keep]
        # Columns that are padding in every row left now cost attention for nothing; without
        # this a batch that others keep joining would grow one column a step for ever.
        start = int(self.mask.any(dim=0).nonzero()[0])
        if start and _stackable(self.cache):
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[..., start:, :], layer.values[..., start:, :]
            self.mask = self.mask[:, start:]

    def stack(self, other: _Rows) -> None:
        """Appends `other`'s rows, left-padding whichever cache is shorter."""
        width = max(self.mask.shape[1], other.mask.shape[1])
        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            mine.keys = torch.cat([_left_pad(mine.keys, width), _left_pad(theirs.keys, width)])
            mine.values = torch.cat([_left_pad(mine.values, width), _left_pad(theirs.values, width)])
        self.mask = torch.cat([_left_pad(self.mask, width), _left_pad(other.mask, width)])
        self.last_pos = torch.cat([self.last_pos, other.last_pos])
        self.logits = torch.cat([self.logits, other.logits])
        self.cands += other.cands


def _left_pad(t: torch.Tensor, width: int) -> torch.Tensor:
    """Zeros before the sequence axis (the last of a mask, the one before last of keys and values)."""
    axis = -1 if t.dim() == 2 else -2
    missing = width - t.shape[axis]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[axis] = missing
    return torch.cat([t.new_zeros(shape), t], dim=axis)


def _stackable(cache: Any) -> bool:
    """Caches whose layers keep every position (no sliding window or recurrent state) can be
    padded and stacked."""
    from transformers.cache_utils import DynamicLayer

    return all(type(layer) is DynamicLayer for layer in getattr(cache, "layers", [None]))


def _load(ref: ModelRef, dtype: torch.dtype, max_model_len: int | None) -> _Weights:
    """A full model (never an adapter) with its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ref.path)
    model = AutoModelForCausalLM.from_pretrained(ref.path, dtype=dtype)
    model.eval()
    eos = model.generation_config.eos_token_id if model.generation_config is not None else None
    if eos is None:
        eos = tokenizer.eos_token_id
    eos_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(eos_ids), 0)
    limit = int(getattr(model.config, "max_position_embeddings", 0) or 2048)
    return _Weights(ref, model, tokenizer, eos_ids, pad, min(limit, max_model_len or limit))


@dataclass(frozen=True)
class _AdapterFiles:
    """An adapter read from disk (in the caller's thread), ready to be applied."""

    name: str
    config: Any  # peft LoraConfig
    state: dict[str, torch.Tensor]
    tokenizer: PreTrainedTokenizerBase | None  # the adapter folder's own, if it has one


def _read_adapter(ref: ModelRef, name: str) -> _AdapterFiles:
    from peft import LoraConfig
    from peft.utils import load_peft_weights
    from transformers import AutoTokenizer

    config = LoraConfig.from_pretrained(ref.path)
    config.inference_mode = True
    state = load_peft_weights(str(ref.path), device="cpu")
    has_tokenizer = (Path(ref.path) / "tokenizer_config.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(ref.path) if has_tokenizer else None
    return _AdapterFiles(name, config, state, tokenizer)


def _apply_adapter(weights: _Weights, files: _AdapterFiles) -> None:
    """Adds the adapter to `weights` and makes it the only one; on failure `weights` is left
    as it was."""
    from peft import PeftModel
    from peft.utils import set_peft_model_state_dict

    first = weights.peft is None
    peft = weights.peft
    try:
        if peft is None:
            peft = PeftModel(weights.model, files.config, adapter_name=files.name)
        else:
            peft.add_adapter(files.name, files.config)
        result = set_peft_model_state_dict(peft, files.state, adapter_name=files.name)
        if result.unexpected_keys:
            raise SwapError(
                f"adapter weights {sorted(result.unexpected_keys)[:3]} match no layer of the base model"
            )
        peft.set_adapter(files.name, inference_mode=True)
    except Exception:
        if peft is not None and first:
            peft.unload()  # takes the adapter layers out of the base model again
        elif peft is not None and files.name in peft.peft_config:
            peft.delete_adapter(files.name)
        raise
    for old in [name for name in peft.peft_config if name != files.name]:
        peft.delete_adapter(old)
    peft.eval()
    weights.peft = peft


def _same(a: ModelRef, b: ModelRef) -> bool:
    return Path(a.path).resolve() == Path(b.path).resolve()


class TransformersEngine(Engine):
    name = "transformers"

    def __init__(self, settings: GenerationSettings) -> None:
        self._dtype = torch.float32 if settings.dtype == "float32" else torch.bfloat16
        self._max_model_len = settings.max_model_len
        self._window_s = settings.batch_window_ms / 1000
        self._max_batch = settings.max_batch_size
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        self._bundle: _Bundle | None = None
        self._pending: deque[_Pending] = deque()
        # Changes to the live model, run by the scheduler thread between batches.
        self._ops: deque[tuple[Callable[[], None], Future[None]]] = deque()
        self._adapters = 0  # peft adapter names are unique per load
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="generation-batcher", daemon=True)

    # ---- Engine ----------------------------------------------------------------------
    def load(self, model: ModelRef) -> None:
        self._bundle = self._fresh(model)
        self._thread.start()

    @property
    def healthy(self) -> bool:
        return self._thread.is_alive()

    @property
    def model(self) -> ModelRef:
        return self._current().ref

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self._current().tokenizer

    @property
    def max_model_len(self) -> int:
        return self._current().max_len

    def generate(self, request: EngineRequest) -> Stream:
        stream = Stream(n=request.sampling.n)
        with self._cond:
            if self._closed:
                raise EngineError("engine is closed")
            self._pending.append(_Pending(request, stream))
            self._cond.notify_all()
        # Cancellation is polled by the scheduler between steps; waking it lets a queued
        # request that was cancelled leave at once.
        stream.on_cancel(self._wake)
        return stream

    def swap(self, model: ModelRef) -> None:
        try:
            live = self._current().weights
            if not _same(model.weights, live.ref):
                # Another base or full model: loaded beside the served one, then one
                # reference assignment (the scheduler reads it once per batch).
                self._bundle = self._fresh(model)
            elif model.adapter:
                # The same base: only the adapter changes, on the live model.
                files = _read_adapter(model, self._adapter_name(model))
                self._between_batches(lambda: self._serve_adapter(model, live, files))
            else:
                # The base of the served adapter becomes the served version.
                self._between_batches(lambda: self._serve_base(model, live))
        except SwapError:
            raise
        except Exception as err:
            raise SwapError(f"cannot load {model.name}@{model.version} from {model.path}: {err}") from err

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        for pending in self._drain_all():
            self._abort_unstarted(pending)
        with self._cond:
            ops, self._ops = list(self._ops), deque()
        for _, future in ops:
            future.set_exception(SwapError("engine is closed"))

    # ---- versions --------------------------------------------------------------------
    def _adapter_name(self, model: ModelRef) -> str:
        self._adapters += 1
        return re.sub(r"\W", "_", f"{model.name}_{model.version}_{self._adapters}")

    def _fresh(self, model: ModelRef) -> _Bundle:
        """`model` loaded from disk, sharing nothing with the served version."""
        weights = _load(model.weights, self._dtype, self._max_model_len)
        if not model.adapter:
            return _Bundle(model, weights, weights.tokenizer)
        files = _read_adapter(model, self._adapter_name(model))
        _apply_adapter(weights, files)
        return _Bundle(model, weights, files.tokenizer or weights.tokenizer, files.name)

    def _serve_adapter(self, model: ModelRef, live: _Weights, files: _AdapterFiles) -> None:
        _apply_adapter(live, files)
        self._bundle = _Bundle(model, live, files.tokenizer or live.tokenizer, files.name)

    def _serve_base(self, model: ModelRef, live: _Weights) -> None:
        if live.peft is not None:
            live.peft.unload()  # the adapter layers leave the base model's modules
            live.peft = None
        self._bundle = _Bundle(model, live, live.tokenizer)

    def _between_batches(self, change: Callable[[], None]) -> None:
        """Runs `change` in the scheduler thread once no batch is in progress; waits for it."""
        future: Future[None] = Future()
        with self._cond:
            if self._closed or not self._thread.is_alive():
                raise SwapError("engine is closed")
            self._ops.append((change, future))
            self._cond.notify_all()
        future.result()

    # ---- scheduler -------------------------------------------------------------------
    def _current(self) -> _Bundle:
        if self._bundle is None:
            raise EngineError("no model loaded")
        return self._bundle

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _drain_all(self) -> list[_Pending]:
        with self._cond:
            items = list(self._pending)
            self._pending.clear()
        return items

    def _abort_unstarted(self, pending: _Pending) -> None:
        pending.stream.model = self._bundle.ref if self._bundle else None
        for index in range(pending.request.sampling.n):
            pending.stream.push(Delta(index=index, text="", completion_tokens=0, finish_reason="aborted"))
        pending.stream.finish()

    def _run_ops(self) -> None:
        """Runs the queued changes to the live model."""
        with self._cond:
            ops, self._ops = list(self._ops), deque()
        for change, future in ops:
            try:
                change()
            except BaseException as err:  # noqa: BLE001 (handed to the caller of swap)
                future.set_exception(err)
            else:
                future.set_result(None)

    def _next_batch(self) -> list[_Pending] | None:
        """Waits for work, then gathers what arrives within the batching window; None once
        closed, [] after running changes to the live model."""
        with self._cond:
            while not self._closed and not self._pending and not self._ops:
                self._cond.wait()
            if self._closed:
                return None
            changes = bool(self._ops)
        if changes:
            self._run_ops()
            return []
        with self._cond:
            window_end = self._pending[0].queued_at + self._window_s
            while not self._closed:
                size = sum(p.request.sampling.n for p in self._pending)
                remaining = window_end - time.monotonic()
                if size >= self._max_batch or remaining <= 0:
                    break
                self._cond.wait(remaining)
            return self._take(self._max_batch, at_least_one=True)

    def _take(self, room: int, at_least_one: bool = False) -> list[_Pending]:
        """Waiting requests, oldest first, while their candidates fit in `room` (call with
        `_cond` held). Whole requests only: all candidates of a request share one batch and
        one version."""
        taken: list[_Pending] = []
        while self._pending:
            n = self._pending[0].request.sampling.n
            if n > room and not (at_least_one and not taken):
                break
            taken.append(self._pending.popleft())
            room -= n
        return taken

    def _joining(self, bundle: _Bundle, room: int) -> list[_Pending]:
        """Requests that join the running batch now: none while a swap or another change
        waits for the batch to end (so it ends), or once the served version changed."""
        if room <= 0 or not self._pending:
            return []
        with self._cond:
            if self._closed or self._ops or self._bundle is not bundle:
                return []
            taken = self._take(room)
        return self._live(taken)

    def _live(self, taken: list[_Pending]) -> list[_Pending]:
        """`taken` without the requests cancelled while they waited (those end 'aborted' now)."""
        live = []
        for pending in taken:
            if pending.stream.cancelled:
                self._abort_unstarted(pending)
            else:
                live.append(pending)
        return live

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            live = self._live(batch)
            if not live:
                continue
            bundle = self._current()
            started: list[_Started] = []
            try:
                with torch.inference_mode():
                    self._generate(bundle, live, started)
            except Exception as err:  # a failed batch fails its requests, not the server
                log.exception("batch generation failed")
                begun = {id(request.pending) for request in started}
                failed = [r.pending for r in started if r.unfinished] + [p for p in live if id(p) not in begun]
                for pending in failed:
                    pending.stream.fail(err)
                    pending.stream.finish()

    def _generate(self, bundle: _Bundle, batch: list[_Pending], started: list[_Started]) -> None:
        """Runs `batch` and whatever joins it until every sequence has finished; `started`
        lists the requests begun so far (the caller fails them if a step raises)."""
        rows = self._prefill(bundle, batch, started)
        peak, stackable = len(rows.cands), _stackable(rows.cache)
        while True:
            tokens, logprobs = self._pick(rows.logits, rows.cands)
            for row, cand in enumerate(rows.cands):
                self._advance(bundle, cand, int(tokens[row]), None if logprobs is None else float(logprobs[row]))
            for cand in rows.cands:
                if not cand.finished and cand.stream.cancelled:
                    self._finish(cand, "aborted")
            keep = [row for row, cand in enumerate(rows.cands) if not cand.finished]
            if not keep:
                break
            if len(keep) < len(rows.cands):
                tokens = tokens[keep]
                rows.select(keep)
            rows.mask = torch.cat([rows.mask, torch.ones((len(rows.cands), 1), dtype=torch.long)], dim=1)
            rows.last_pos = rows.last_pos + 1
            out = bundle.forward(
                rows.cands,
                input_ids=tokens[:, None],
                attention_mask=rows.mask,
                position_ids=rows.last_pos[:, None],
                past_key_values=rows.cache,
                use_cache=True,
            )
            rows.logits = out.logits[:, -1, :].float()
            if stackable:
                joining = self._joining(bundle, self._max_batch - len(rows.cands))
                if joining:
                    rows.stack(self._prefill(bundle, joining, started))
                    peak = max(peak, len(rows.cands))
        metrics.BATCH_SIZE.observe(peak)

    def _prefill(self, bundle: _Bundle, batch: list[_Pending], started: list[_Started]) -> _Rows:
        """The candidates of `batch` with their prompts run through the model."""
        cands: list[_Candidate] = []
        for pending in batch:
            base = bundle.ref.base if pending.request.use_base else None
            pending.stream.model = base or bundle.ref
            req = pending.request
            sampling = req.sampling
            budget = min(sampling.max_tokens, bundle.max_len - len(req.prompt_ids))
            request = _Started(pending, sampling.n)
            started.append(request)
            for index in range(sampling.n):
                gen = None
                if sampling.temperature > 0:
                    # Candidate i of a seeded request uses seed + i (as vLLM does), so a
                    # seeded answer does not depend on what else shares the batch.
                    seed = sampling.seed + index if sampling.seed is not None else secrets.randbits(63)
                    gen = torch.Generator().manual_seed(seed % (1 << 63))
                cands.append(_Candidate(request, index, gen, TextTracker(bundle.tokenizer, sampling.stop), budget))

        width = max(len(c.request.prompt_ids) for c in cands)
        ids = torch.full((len(cands), width), bundle.pad_id, dtype=torch.long)
        mask = torch.zeros((len(cands), width), dtype=torch.long)
        for row, cand in enumerate(cands):
            prompt = cand.request.prompt_ids
            ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            mask[row, width - len(prompt) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        # logits_to_keep=1: only the last position's logits are needed, not prompt-length x vocab.
        out = bundle.forward(
            cands, input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1
        )
        return _Rows(cands, out.past_key_values, mask, positions[:, -1], out.logits[:, -1, :].float())

    @staticmethod
    def _pick(logits: torch.Tensor, rows: list[_Candidate]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Next token of every row (greedy or sampled) and, if any row wants them, raw logprobs."""
        tokens = logits.argmax(dim=-1)
        for row, cand in enumerate(rows):
            s = cand.request.sampling
            if s.temperature <= 0:
                continue
            probs = torch.softmax(logits[row] / s.temperature, dim=-1)
            if s.top_p < 1.0:
                sorted_probs, order = probs.sort(descending=True)
                # Keep the smallest prefix whose mass reaches top_p (the top token always stays).
                drop = sorted_probs.cumsum(-1) - sorted_probs >= s.top_p
                sorted_probs[drop] = 0.0
                probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
            tokens[row] = torch.multinomial(probs, 1, generator=cand.generator)[0]
        if not any(c.request.sampling.logprobs for c in rows):
            return tokens, None
        # Log-probabilities under the model itself, before temperature or top-p (as vLLM reports them).
        logprobs = torch.log_softmax(logits, dim=-1).gather(1, tokens[:, None])[:, 0]
        return tokens, logprobs

    def _advance(self, bundle: _Bundle, cand: _Candidate, token: int, logprob: float | None) -> None:
        cand.tokens += 1
        metrics.TOKENS_GENERATED.inc()
        lp: tuple[tuple[str, float], ...] = ()
        if cand.request.sampling.logprobs and logprob is not None:
            lp = ((bundle.tokenizer.decode([token]), logprob),)
        if token in bundle.eos_ids:
            self._finish(cand, "stop", logprobs=lp)
            return
        delta = cand.text.add(token)
        if cand.text.stopped:
            self._finish(cand, "stop", delta, lp)
        elif cand.tokens >= cand.budget:
            self._finish(cand, "length", delta, lp)
        elif delta or lp:
            cand.stream.push(Delta(cand.index, delta, cand.tokens, lp))

    @staticmethod
    def _finish(
        cand: _Candidate, reason: FinishReason, delta: str = "", logprobs: tuple[tuple[str, float], ...] = ()
    ) -> None:
        cand.finished = True
        text = delta + cand.text.flush()
        cand.stream.push(Delta(cand.index, text, cand.tokens, logprobs, reason))
        cand.started.candidate_done()
