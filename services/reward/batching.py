"""Dynamic batching across concurrent calls: one thread forms batches of up to
`max_batch` pairs from whatever calls arrived within `window_s` of the oldest, runs them
through their scorer, and hands each call its scores.

A call larger than a batch is cut into segments. Only segments of one scorer share a batch
(a swap mid-queue leaves earlier calls on the version that encoded them). When a mixed
batch fails, its segments are rerun one call at a time so that one call's bad input (a
judge answer that cannot be parsed) fails that call only.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from tuneloop.reward import metrics
from tuneloop.reward.scorer import Scorer

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Call:
    scorer: Scorer
    scores: list[float]
    pending: int
    enqueued: float = field(default_factory=time.monotonic)
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    cancelled: bool = False

    def finish(self, start: int, scores: list[float]) -> None:
        self.scores[start : start + len(scores)] = scores
        self.pending -= 1
        if self.pending == 0:
            self.done.set()

    def fail(self, error: BaseException) -> None:
        self.error = self.error or error
        self.done.set()


@dataclass(eq=False)
class _Segment:
    call: _Call
    start: int
    items: list[Any]


class Batcher:
    """Runs scorers on batches formed across calls; `score` blocks the calling thread."""

    def __init__(self, max_batch: int, window_s: float) -> None:
        self.max_batch = max_batch
        self.window_s = window_s
        self._queue: deque[_Segment] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="reward-batcher", daemon=True)
        self._thread.start()

    def score(self, scorer: Scorer, items: list[Any], timeout_s: float | None = None) -> list[float]:
        """Scores of `items` under `scorer`; TimeoutError past `timeout_s` (the call's deadline)."""
        segments = range(0, len(items), self.max_batch)
        call = _Call(scorer, [0.0] * len(items), pending=len(segments))
        with self._cond:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            self._queue.extend(_Segment(call, s, items[s : s + self.max_batch]) for s in segments)
            self._cond.notify()
        if not call.done.wait(timeout_s):
            call.cancelled = True  # its segments not yet run are skipped
            raise TimeoutError(f"scoring {len(items)} pairs took longer than {timeout_s:.3f}s")
        if call.error is not None:
            raise call.error
        return call.scores

    def close(self) -> None:
        """Finishes the queued work, then stops the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()

    def _take(self) -> list[_Segment] | None:
        """The next batch: segments of the oldest one's scorer, waiting up to the window for more."""
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if not self._queue:
                return None
            head = self._queue[0]
            deadline = head.call.enqueued + self.window_s
            while not self._closed:
                ready = sum(len(s.items) for s in self._queue if s.call.scorer is head.call.scorer)
                left = deadline - time.monotonic()
                if ready >= self.max_batch or left <= 0:
                    break
                self._cond.wait(left)
            batch, size, rest = [], 0, deque()
            for seg in self._queue:
                fits = size + len(seg.items) <= self.max_batch
                if seg.call.scorer is head.call.scorer and fits and not seg.call.cancelled:
                    batch.append(seg)
                    size += len(seg.items)
                elif not seg.call.cancelled:
                    rest.append(seg)
            self._queue = rest
            return batch

    def _run(self) -> None:
        while (batch := self._take()) is not None:
            if batch:
                self._run_batch(batch)

    def _run_batch(self, batch: list[_Segment]) -> None:
        scorer = batch[0].call.scorer
        items = [item for seg in batch for item in seg.items]
        now = time.monotonic()
        for seg in batch:
            metrics.QUEUE_SECONDS.observe(now - seg.call.enqueued)
        try:
            with metrics.INFERENCE_SECONDS.time():
                scores = scorer.score(items)
            if len(scores) != len(items):
                raise RuntimeError(f"scorer returned {len(scores)} scores for {len(items)} pairs")
            metrics.BATCH_SIZE.observe(len(items))
        except Exception as err:
            if len({id(seg.call) for seg in batch}) > 1:
                for call in dict.fromkeys(seg.call for seg in batch):
                    self._run_batch([seg for seg in batch if seg.call is call])
                return
            log.warning("scoring failed", extra={"fields": {"pairs": len(items), "error": repr(err)}})
            batch[0].call.fail(err)
            return
        offset = 0
        for seg in batch:
            seg.call.finish(seg.start, scores[offset : offset + len(seg.items)])
            offset += len(seg.items)
