"""The Reward service's dynamic batcher, driven deterministically: a scorer that holds its
first batch until released lets the next calls queue up behind it."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pytest

from tuneloop.reward.batching import Batcher
from tuneloop.v1 import completion_pb2


class HeldScorer:
    """Scores an item as its number; holds the first batch until `release` is set."""

    def __init__(self, name: str = "held") -> None:
        self.version = completion_pb2.ModelVersion(name=name, version="v0001")
        self.batches: list[list[Any]] = []
        self.started = threading.Event()
        self.release = threading.Event()

    def prepare(self, prompt: Any, response: str, field: str) -> Any:
        return response

    def score(self, items: list[Any]) -> list[float]:
        self.batches.append(list(items))
        self.started.set()
        self.release.wait(30)
        if any(item == "bad" for item in items):
            raise ValueError("cannot score 'bad'")
        return [float(item) for item in items]


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(16) as executor:
        yield executor


def _queued(batcher: Batcher, n: int) -> None:
    """Waits until `n` segments wait in the batcher's queue."""
    done = threading.Event()
    while not done.wait(0.01):
        with batcher._cond:
            if len(batcher._queue) >= n:
                return


def test_concurrent_calls_share_a_batch_and_get_their_own_scores(pool: ThreadPoolExecutor) -> None:
    scorer = HeldScorer()
    batcher = Batcher(max_batch=16, window_s=0.0)
    try:
        first = pool.submit(batcher.score, scorer, ["1"])
        assert scorer.started.wait(10)
        calls: list[Future[list[float]]] = [
            pool.submit(batcher.score, scorer, [str(10 * k), str(10 * k + 1)]) for k in range(1, 6)
        ]
        _queued(batcher, 5)
        scorer.release.set()
        assert first.result(10) == [1.0]
        for k, call in enumerate(calls, start=1):
            assert call.result(10) == [10.0 * k, 10.0 * k + 1]
        assert [len(b) for b in scorer.batches] == [1, 10]
    finally:
        scorer.release.set()
        batcher.close()


def test_a_call_larger_than_a_batch_is_cut_and_kept_in_order() -> None:
    scorer = HeldScorer()
    scorer.release.set()
    batcher = Batcher(max_batch=16, window_s=0.0)
    try:
        items = [str(i) for i in range(40)]
        assert batcher.score(scorer, items, 10) == [float(i) for i in range(40)]
        assert [len(b) for b in scorer.batches] == [16, 16, 8]
    finally:
        batcher.close()


def test_one_bad_call_fails_alone(pool: ThreadPoolExecutor) -> None:
    scorer = HeldScorer()
    batcher = Batcher(max_batch=16, window_s=0.0)
    try:
        first = pool.submit(batcher.score, scorer, ["1"])
        assert scorer.started.wait(10)
        good = pool.submit(batcher.score, scorer, ["2", "3"])
        bad = pool.submit(batcher.score, scorer, ["4", "bad"])
        _queued(batcher, 2)
        scorer.release.set()
        assert first.result(10) == [1.0]
        assert good.result(10) == [2.0, 3.0]
        with pytest.raises(ValueError, match="cannot score 'bad'"):
            bad.result(10)
    finally:
        scorer.release.set()
        batcher.close()


def test_scorers_do_not_share_batches(pool: ThreadPoolExecutor) -> None:
    old, new = HeldScorer("old"), HeldScorer("new")
    new.release.set()
    batcher = Batcher(max_batch=16, window_s=0.0)
    try:
        first = pool.submit(batcher.score, old, ["1"])
        assert old.started.wait(10)
        calls = [pool.submit(batcher.score, s, [str(i)]) for i, s in enumerate((old, new, old, new), start=2)]
        _queued(batcher, 4)
        old.release.set()
        assert [c.result(10) for c in calls] == [[2.0], [3.0], [4.0], [5.0]]
        assert first.result(10) == [1.0]
        assert [sorted(b) for b in old.batches] == [["1"], ["2", "4"]]
        assert [sorted(b) for b in new.batches] == [["3", "5"]]
    finally:
        old.release.set()
        batcher.close()


def test_a_call_past_its_deadline_times_out_and_is_skipped(pool: ThreadPoolExecutor) -> None:
    scorer = HeldScorer()
    batcher = Batcher(max_batch=16, window_s=0.0)
    try:
        first = pool.submit(batcher.score, scorer, ["1"])
        assert scorer.started.wait(10)
        with pytest.raises(TimeoutError):
            batcher.score(scorer, ["2"], timeout_s=0.05)
        scorer.release.set()
        assert first.result(10) == [1.0]
        assert batcher.score(scorer, ["3"], 10) == [3.0]
        assert ["2"] not in scorer.batches
    finally:
        scorer.release.set()
        batcher.close()
