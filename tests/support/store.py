"""Helpers of the store tests: completion records and feedback events, a producer to the store's topics, and
stepping a store until a condition holds."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

import pandas as pd

from tuneloop.common.kafka import KafkaSettings, make_producer
from tuneloop.store.consumer import PreferenceStore
from tuneloop.store.read import (
    load_rows,
)
from tuneloop.store.settings import StoreSettings
from tuneloop.v1 import completion_pb2, feedback_pb2


QUESTION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of France?"}]


def completion(
    cid: str,
    text: str,
    *,
    question: list[dict] = QUESTION,
    tenant: str = "acme",
    request_id: str = "req-1",
    version: str = "v0001",
    raw: str | None = None,
) -> completion_pb2.CompletionRecord:
    prompt = (
        completion_pb2.Prompt(raw=raw)
        if raw is not None
        else completion_pb2.Prompt(
            chat=completion_pb2.Conversation(messages=[completion_pb2.ChatMessage(**m) for m in question])
        )
    )
    record = completion_pb2.CompletionRecord(
        completion_id=cid,
        request_id=request_id,
        conversation_id=request_id,
        tenant=tenant,
        prompt=prompt,
        rendered_prompt=f"<rendered {request_id}>",
        completion=completion_pb2.Completion(completion_id=cid, text=text),
        model=completion_pb2.ModelVersion(name="policy", version=version),
    )
    record.created_at.GetCurrentTime()
    return record


def event(
    *,
    pairwise: tuple[str, str, int] | None = None,
    score: tuple[str, float] | None = None,
    thumb: tuple[str, bool] | None = None,
    ranking: list[str] | None = None,
    event_id: str | None = None,
    annotator: str = "ann-1",
    tenant: str = "acme",
    source: int = feedback_pb2.FEEDBACK_SOURCE_ANNOTATOR,
    **extra: object,
) -> feedback_pb2.FeedbackEvent:
    ev = feedback_pb2.FeedbackEvent(
        event_id=uuid.uuid4().hex if event_id is None else event_id,
        tenant=tenant,
        source=source,
        annotator_id=annotator,
        **extra,
    )
    ev.created_at.GetCurrentTime()
    if pairwise:
        ev.pairwise.CopyFrom(
            feedback_pb2.PairwiseJudgement(completion_a_id=pairwise[0], completion_b_id=pairwise[1], choice=pairwise[2])
        )
    if score:
        ev.rating.CopyFrom(feedback_pb2.RatingJudgement(completion_id=score[0], score=score[1]))
    if thumb:
        ev.rating.CopyFrom(feedback_pb2.RatingJudgement(completion_id=thumb[0], thumbs_up=thumb[1]))
    if ranking:
        ev.ranking.completion_ids.extend(ranking)
    return ev


def cid() -> str:
    return "cmpl-" + uuid.uuid4().hex


class Sender:
    """Produces protobufs (or raw bytes) to the store's topics and waits for the acks."""

    def __init__(self, kafka: KafkaSettings, settings: StoreSettings) -> None:
        self.producer = make_producer(kafka)
        self.settings = settings

    def completions(self, *records: completion_pb2.CompletionRecord) -> None:
        for r in records:
            self.producer.send(
                self.settings.completions_topic, key=r.conversation_id.encode(), value=r.SerializeToString()
            )
        self.producer.flush()

    def feedback(self, *events: feedback_pb2.FeedbackEvent | bytes) -> None:
        for e in events:
            value = e if isinstance(e, bytes) else e.SerializeToString()
            key = b"garbage" if isinstance(e, bytes) else (e.item_id or e.event_id).encode()
            self.producer.send(self.settings.feedback_topic, key=key, value=value)
        self.producer.flush()


def drive(store: PreferenceStore, until: Callable[[], bool], timeout_s: float = 150.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not until():
        assert time.monotonic() < deadline, f"store did not get there in time: {store.positions} {store._versions}"
        store.step()


def rows_of(store: PreferenceStore) -> pd.DataFrame:
    return load_rows(store.root)
