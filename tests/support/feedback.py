"""Helpers of the Feedback tests: events of each kind, a server on free ports, and its topic read back."""

from __future__ import annotations

import time
import uuid

import grpc
from kafka import KafkaConsumer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord

from tuneloop.common.grpc_server import GrpcServer
from tuneloop.feedback.settings import FeedbackSettings
from tuneloop.v1 import feedback_pb2, feedback_pb2_grpc


ACCEPTED = feedback_pb2.SUBMIT_STATUS_ACCEPTED
DUPLICATE = feedback_pb2.SUBMIT_STATUS_DUPLICATE
REJECTED = feedback_pb2.SUBMIT_STATUS_REJECTED
Event = feedback_pb2.FeedbackEvent


def new_id() -> str:
    return uuid.uuid4().hex


def base(event_id: str | None = None, **fields: object) -> Event:
    values: dict[str, object] = dict(
        source=feedback_pb2.FEEDBACK_SOURCE_ANNOTATOR, annotator_id="ann-1", project="helpfulness"
    )
    values.update(fields)
    event = Event(event_id=event_id or new_id(), **values)
    event.created_at.GetCurrentTime()
    return event


def pairwise(event_id: str | None = None, a: str = "cmpl-a", b: str = "cmpl-b", **fields: object) -> Event:
    return base(
        event_id,
        pairwise=feedback_pb2.PairwiseJudgement(
            completion_a_id=a, completion_b_id=b, choice=feedback_pb2.PAIRWISE_CHOICE_A
        ),
        **fields,
    )


def rating(event_id: str | None = None) -> Event:
    judgement = feedback_pb2.RatingJudgement(completion_id="cmpl-r", score=4, scale_min=1, scale_max=5)
    return base(event_id, rating=judgement)


def ranking(event_id: str | None = None) -> Event:
    return base(event_id, ranking=feedback_pb2.RankingJudgement(completion_ids=["c3", "c1", "c2"]))


def feedback_settings(topic: str, **overrides: object) -> FeedbackSettings:
    values: dict[str, object] = dict(
        port=0, metrics_port=0, host="127.0.0.1", topic=topic, produce_timeout_s=5.0, grace_seconds=1.0
    )
    values.update(overrides)
    return FeedbackSettings(**values)


def stub_for(server: GrpcServer) -> feedback_pb2_grpc.FeedbackStub:
    # A plain channel (no retry policy): the tests look at each answer the server gives.
    return feedback_pb2_grpc.FeedbackStub(grpc.insecure_channel(f"127.0.0.1:{server.port}"))


def read_topic(bootstrap: str, topic: str, timeout_s: float = 30.0) -> list[ConsumerRecord]:
    """Every record on the topic right now, all partitions."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    try:
        partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))]
        consumer.assign(partitions)
        consumer.seek_to_beginning()
        ends = consumer.end_offsets(partitions)
        records: list[ConsumerRecord] = []
        deadline = time.monotonic() + timeout_s
        while any(consumer.position(tp) < ends[tp] for tp in partitions):
            assert time.monotonic() < deadline, "topic not read to its end in time"
            for batch in consumer.poll(timeout_ms=500).values():
                records.extend(batch)
        return records
    finally:
        consumer.close()
