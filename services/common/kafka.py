"""Kafka topics and client setup shared by every service.

Client library: kafka-python (3.x). It is pure Python, so it installs from PyPI on any platform
with no C toolchain or librdkafka to match, and 3.x covers what the platform relies on: the
idempotent producer (on by default, acks=all, up to 5 requests in flight without reordering),
transactions, read_committed consumers, consumer groups with manual commits, and an admin
client (topic creation, ListOffsets). The price is throughput: a Python producer spends CPU per
record where librdkafka (confluent-kafka) would not. Our streams are human feedback and one
record per completion, orders of magnitude below what a single Python producer sustains, so
the simpler dependency wins; `bench/bench_kafka.py` measures the gap against Kafka's own Java
producer on the same broker.

Keys are bytes (they pick the partition, so one prompt's events stay in order); values are
serialized protobuf messages, passed in and out as bytes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from kafka import IsolationLevel, KafkaAdminClient, KafkaConsumer, KafkaProducer, OffsetSpec, TopicPartition
from kafka.errors import TopicAlreadyExistsError, for_code
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

COMPLETIONS_TOPIC = "tuneloop.completions.v1"
FEEDBACK_TOPIC = "tuneloop.feedback.v1"
FEEDBACK_DLQ_TOPIC = "tuneloop.feedback.dlq.v1"
MODELS_TOPIC = "tuneloop.models.v1"
ALL_TOPICS = (COMPLETIONS_TOPIC, FEEDBACK_TOPIC, FEEDBACK_DLQ_TOPIC, MODELS_TOPIC)


class KafkaSettings(BaseSettings):
    """Where the stream is and how clients talk to it (env: TUNELOOP_KAFKA_*)."""

    model_config = SettingsConfigDict(env_prefix="TUNELOOP_KAFKA_")

    bootstrap_servers: str = Field(
        "127.0.0.1:9092", description="Comma-separated host:port list of brokers to bootstrap from."
    )
    client_id: str = Field(
        "tuneloop", description="Client id sent with every request (shows in broker logs and quotas)."
    )
    partitions: int = Field(3, ge=1, description="Partition count for topics that ensure_topics creates.")
    replication_factor: int = Field(
        1, ge=1, description="Replication factor for topics that ensure_topics creates (3 on a real cluster)."
    )
    linger_ms: int = Field(5, ge=0, description="How long the producer waits to fill a batch before sending it.")
    request_timeout_ms: int = Field(30_000, ge=1, description="Timeout of one request to a broker.")
    reconnect_backoff_max_ms: int = Field(
        1_000,
        ge=1,
        description="Cap on the growing wait between reconnects to a broker that was down "
        "(kafka-python's default of 30 s would keep clients away long after a broker restart).",
    )
    metadata_max_age_ms: int = Field(
        15_000,
        ge=1,
        description="How often clients refresh topic metadata even without a change. A consumer group "
        "that formed before its topics' partitions were known takes them up within this time "
        "(kafka-python's default of 5 min would leave it idle that long).",
    )
    delivery_timeout_ms: int = Field(
        120_000, ge=1, description="Upper bound on reporting a produced record as sent or failed, retries included."
    )
    isolation_level: Literal["read_committed", "read_uncommitted"] = Field(
        "read_committed",
        description="Consumers see only committed transactional records (read_committed) or all of them.",
    )
    topic_ready_timeout_s: float = Field(
        30.0, gt=0, description="How long ensure_topics waits for created topics to have leaders."
    )


def make_producer(settings: KafkaSettings, transactional_id: str | None = None) -> KafkaProducer:
    """An idempotent producer: acks from all in-sync replicas, retried without duplicates or reordering.

    Setting enable_idempotence explicitly makes kafka-python raise on any conflicting option
    instead of quietly turning idempotence off. With `transactional_id` it is transactional
    (call `init_transactions()` first): consume-transform-produce loops commit their output
    and their input offsets atomically.
    """
    return KafkaProducer(
        bootstrap_servers=settings.bootstrap_servers,
        client_id=settings.client_id,
        enable_idempotence=True,
        transactional_id=transactional_id,
        acks="all",
        # Idempotence keeps order with up to 5 requests in flight per connection.
        max_in_flight_requests_per_connection=5,
        linger_ms=settings.linger_ms,
        request_timeout_ms=settings.request_timeout_ms,
        reconnect_backoff_max_ms=settings.reconnect_backoff_max_ms,
        delivery_timeout_ms=settings.delivery_timeout_ms,
    )


def make_consumer(settings: KafkaSettings, group_id: str, topics: Sequence[str] = ()) -> KafkaConsumer:
    """A group consumer that commits only when the caller says the records are processed.

    Without `topics` nothing is subscribed: the caller assigns partitions itself.
    """
    return KafkaConsumer(
        *topics,
        bootstrap_servers=settings.bootstrap_servers,
        client_id=settings.client_id,
        group_id=group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level=settings.isolation_level,
        request_timeout_ms=settings.request_timeout_ms,
        reconnect_backoff_max_ms=settings.reconnect_backoff_max_ms,
        metadata_max_age_ms=settings.metadata_max_age_ms,
    )


def make_admin(settings: KafkaSettings) -> KafkaAdminClient:
    return KafkaAdminClient(
        bootstrap_servers=settings.bootstrap_servers,
        client_id=settings.client_id,
        request_timeout_ms=settings.request_timeout_ms,
        reconnect_backoff_max_ms=settings.reconnect_backoff_max_ms,
    )


def ensure_topics(settings: KafkaSettings, topics: Iterable[str] = ALL_TOPICS) -> set[str]:
    """Create the topics that do not exist yet, wait until all have leaders; return those created."""
    names = list(dict.fromkeys(topics))
    if not names:
        return set()
    spec = {"num_partitions": settings.partitions, "replication_factor": settings.replication_factor}
    with make_admin(settings) as admin:
        existing = set(admin.list_topics())
        missing = [name for name in names if name not in existing]
        created: set[str] = set()
        if missing:
            response = admin.create_topics({name: spec for name in missing}, raise_errors=False)
            for topic in response["topics"]:
                error = for_code(topic["error_code"])
                if topic["error_code"] == 0:
                    created.add(topic["name"])
                # Another process may create the same topic between our listing and our request.
                elif error is not TopicAlreadyExistsError:
                    raise error(f"creating topic {topic['name']}: {topic.get('error_message')}")
        admin.wait_for_topics(names, timeout_ms=int(settings.topic_ready_timeout_s * 1000))
    return created


_SNAPSHOT_ID = re.compile(r"^(?P<topic>[A-Za-z0-9._-]+)@(?P<parts>\d+:\d+(?:,\d+:\d+)*)$")


@dataclass(frozen=True)
class OffsetSnapshot:
    """A topic's end offsets at one moment: exactly the records before them form a dataset.

    `id` is stable text (for lineage and file names), e.g. `tuneloop.feedback.v1@0:12,1:40,2:7`.
    """

    topic: str
    offsets: Mapping[int, int]

    @property
    def id(self) -> str:
        parts = ",".join(f"{p}:{o}" for p, o in sorted(self.offsets.items()))
        return f"{self.topic}@{parts}"

    @classmethod
    def parse(cls, snapshot_id: str) -> OffsetSnapshot:
        match = _SNAPSHOT_ID.match(snapshot_id)
        if match is None:
            raise ValueError(f"not a snapshot id (topic@partition:offset,...): {snapshot_id!r}")
        pairs = (part.split(":") for part in match["parts"].split(","))
        return cls(match["topic"], {int(p): int(o) for p, o in pairs})


def end_offsets(settings: KafkaSettings, topic: str) -> dict[int, int]:
    """Per partition, the end offset a consumer with our isolation level sees.

    Under read_committed it is the last stable offset: records of a still open transaction
    lie beyond it, so a snapshot never includes what may yet be aborted.
    """
    committed = settings.isolation_level == "read_committed"
    isolation = IsolationLevel.READ_COMMITTED if committed else IsolationLevel.READ_UNCOMMITTED
    with make_admin(settings) as admin:
        (described,) = admin.describe_topics([topic])
        if described["error_code"] != 0:
            raise for_code(described["error_code"])(f"describing topic {topic}")
        specs = {TopicPartition(topic, p["partition_index"]): OffsetSpec.LATEST for p in described["partitions"]}
        found = admin.list_partition_offsets(specs, isolation_level=isolation)
    return {tp.partition: found[tp].offset for tp in sorted(found)}


def snapshot_offsets(settings: KafkaSettings, topic: str) -> OffsetSnapshot:
    return OffsetSnapshot(topic, end_offsets(settings, topic))
