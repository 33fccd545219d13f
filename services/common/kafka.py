"""Kafka topics and client setup shared by every service.

Client library: kafka-python (3.x). It is pure Python, so it installs from PyPI on any platform
with no C toolchain or librdkafka to match, and 3.x covers what the platform relies on: the
idempotent producer (on by default, acks=all, up to 5 requests in flight without reordering),
transactions, read_committed consumers, consumer groups with manual commits, and an admin
client (topic creation, ListOffsets). The price is throughput: a Python producer spends CPU per
record where librdkafka (confluent-kafka) does not. Most of our streams (one record per
completion, model events, dead letters) are far below what a Python producer sustains; the
one that is not, the Feedback service's ingestion, produces through librdkafka
(`tuneloop.common.native_producer`, the same settings). `bench/bench_kafka.py` measures
kafka-python against Kafka's own Java producer on the same broker.

Keys are bytes (they pick the partition, so one prompt's events stay in order); values are
serialized protobuf messages, passed in and out as bytes.

Security: every client gets the same TLS and SASL/SCRAM options from `client_security`, so a
producer, a consumer and an admin client of one process authenticate as the same Kafka user
and trust the same CA; what that user may do is the broker's ACLs (`tuneloop.common.kafka_acls`).
"""

from __future__ import annotations

import re
import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Self

from kafka import IsolationLevel, KafkaAdminClient, KafkaConsumer, KafkaProducer, OffsetSpec, TopicPartition
from kafka.errors import KafkaError, TopicAlreadyExistsError, for_code
from pydantic import Field, FilePath, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

COMPLETIONS_TOPIC = "tuneloop.completions.v1"
FEEDBACK_TOPIC = "tuneloop.feedback.v1"
FEEDBACK_DLQ_TOPIC = "tuneloop.feedback.dlq.v1"
MODELS_TOPIC = "tuneloop.models.v1"
ALL_TOPICS = (COMPLETIONS_TOPIC, FEEDBACK_TOPIC, FEEDBACK_DLQ_TOPIC, MODELS_TOPIC)

SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]


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
    batch_size: int = Field(
        131_072,
        ge=1,
        le=1_000_000,
        description="Most bytes of records one producer batch holds per partition. Larger batches mean "
        "fewer requests and less of the client's per-batch work: 128 KiB carried about 1.3x the Feedback "
        "service's 1 KiB events of Kafka's default 16 KiB; a broker takes batches up to its "
        "message.max.bytes (1 MiB by default).",
    )
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
    security_protocol: SecurityProtocol = Field(
        "PLAINTEXT",
        description="How clients talk to the brokers: PLAINTEXT, SSL (TLS), SASL_PLAINTEXT or SASL_SSL "
        "(SCRAM over TLS, what an authenticated cluster asks for).",
    )
    sasl_mechanism: Literal["SCRAM-SHA-512", "SCRAM-SHA-256"] = Field(
        "SCRAM-SHA-512", description="SASL mechanism of the SASL_* protocols (Strimzi's scram-sha-512 by default)."
    )
    sasl_username: str | None = Field(
        None, min_length=1, description="SASL user (the KafkaUser of this service); required by SASL_*."
    )
    sasl_password: SecretStr | None = Field(
        None, description="Password of sasl_username; give it or sasl_password_file with SASL_*."
    )
    sasl_password_file: FilePath | None = Field(
        None,
        description="File holding the password of sasl_username (a mounted Secret key); read each time a "
        "client is made, so a rotated password is picked up by the next client.",
    )
    ssl_cafile: FilePath | None = Field(
        None,
        description="PEM file of the CA that signed the brokers' certificates (Strimzi: the cluster CA "
        "Secret's ca.crt); unset: the system trust store.",
    )
    ssl_certfile: FilePath | None = Field(
        None, description="PEM client certificate, for brokers that authenticate clients by TLS (mTLS)."
    )
    ssl_keyfile: FilePath | None = Field(None, description="PEM private key of ssl_certfile.")
    ssl_check_hostname: bool = Field(
        True, description="Check that a broker's certificate names the host the client connected to."
    )

    @model_validator(mode="after")
    def _security_is_complete(self) -> Self:
        """Refuse half-configured security at start-up, naming the setting, instead of a
        handshake or authentication failure at the first request."""
        protocol = self.security_protocol
        env = self.model_config.get("env_prefix", "")
        uses_sasl, uses_tls = protocol.startswith("SASL_"), protocol.endswith("SSL")
        if uses_sasl:
            if not self.sasl_username:
                raise ValueError(f"sasl_username ({env}SASL_USERNAME) is required with security_protocol {protocol}")
            if (self.sasl_password is None) == (self.sasl_password_file is None):
                raise ValueError(
                    f"give exactly one of sasl_password ({env}SASL_PASSWORD) and sasl_password_file "
                    f"({env}SASL_PASSWORD_FILE) with security_protocol {protocol}"
                )
        else:
            # Credentials next to a protocol that never sends them mean a forgotten protocol.
            for name in ("sasl_username", "sasl_password", "sasl_password_file"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name} is set but security_protocol {protocol} does not use SASL")
        if not uses_tls:
            for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name} is set but security_protocol {protocol} does not use TLS")
        if self.ssl_keyfile is not None and self.ssl_certfile is None:
            raise ValueError("ssl_keyfile needs ssl_certfile (the certificate the key belongs to)")
        return self

    def sasl_secret(self) -> str | None:
        """The SASL password: the setting, or the file's content without its trailing newline."""
        if self.sasl_password is not None:
            return self.sasl_password.get_secret_value()
        if self.sasl_password_file is not None:
            return Path(self.sasl_password_file).read_text().rstrip("\r\n")
        return None


def client_security(settings: KafkaSettings) -> dict[str, Any]:
    """kafka-python options for TLS and SASL, the same for producers, consumers and admin clients."""
    options: dict[str, Any] = {"security_protocol": settings.security_protocol}
    if settings.security_protocol.endswith("SSL"):
        options["ssl_check_hostname"] = settings.ssl_check_hostname
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            if (path := getattr(settings, name)) is not None:
                options[name] = str(path)
    if settings.security_protocol.startswith("SASL_"):
        # kafka-python names them "plain" for every mechanism, SCRAM included.
        options.update(
            sasl_mechanism=settings.sasl_mechanism,
            sasl_plain_username=settings.sasl_username,
            sasl_plain_password=settings.sasl_secret(),
        )
    return options


def serves(bootstrap: str, timeout_s: float = 2.0, security: Mapping[str, Any] | None = None) -> bool:
    """Whether a broker answers a metadata request at `bootstrap` and lists itself in it.

    An open port is not enough: a broker still starting accepts connections before it can
    answer. `security`: the kafka-python TLS/SASL options (`client_security`) of a broker that
    only speaks SASL_SSL; a refused handshake or login counts as not serving.
    """
    host, _, port = bootstrap.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except OSError:
        return False
    timeout_ms = int(timeout_s * 1000)
    try:
        admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="tuneloop-broker-probe",
                                 bootstrap_timeout_ms=timeout_ms, request_timeout_ms=timeout_ms,
                                 **(security or {}))
    except KafkaError:
        return False
    try:
        return bool(admin.describe_cluster()["brokers"])
    except KafkaError:
        return False
    finally:
        admin.close()


def any_broker_serves(settings: KafkaSettings, timeout_s: float = 2.0) -> bool:
    """Whether one of `settings.bootstrap_servers` serves (`serves`), logged in as `settings` say:
    a cheap check before making clients, which would otherwise retry against a broker that is
    down for their whole timeout."""
    security = client_security(settings)
    brokers = [b.strip() for b in settings.bootstrap_servers.split(",") if b.strip()]
    return any(serves(b, timeout_s=timeout_s, security=security) for b in brokers)


def connection_options(settings: KafkaSettings) -> dict[str, Any]:
    """The kafka-python options every client of ours takes: where the brokers are, who we are,
    timeouts, and how to log in (`client_security`)."""
    return {
        "bootstrap_servers": settings.bootstrap_servers,
        "client_id": settings.client_id,
        "request_timeout_ms": settings.request_timeout_ms,
        "reconnect_backoff_max_ms": settings.reconnect_backoff_max_ms,
        **client_security(settings),
    }


def make_producer(settings: KafkaSettings, transactional_id: str | None = None) -> KafkaProducer:
    """An idempotent producer: acks from all in-sync replicas, retried without duplicates or reordering.

    Setting enable_idempotence explicitly makes kafka-python raise on any conflicting option
    instead of quietly turning idempotence off. With `transactional_id` it is transactional
    (call `init_transactions()` first): consume-transform-produce loops commit their output
    and their input offsets atomically.
    """
    return KafkaProducer(
        **connection_options(settings),
        enable_idempotence=True,
        transactional_id=transactional_id,
        acks="all",
        # Idempotence keeps order with up to 5 requests in flight per connection.
        max_in_flight_requests_per_connection=5,
        linger_ms=settings.linger_ms,
        batch_size=settings.batch_size,
        delivery_timeout_ms=settings.delivery_timeout_ms,
    )


def make_consumer(settings: KafkaSettings, group_id: str, topics: Sequence[str] = ()) -> KafkaConsumer:
    """A group consumer that commits only when the caller says the records are processed.

    Without `topics` nothing is subscribed: the caller assigns partitions itself.
    """
    return KafkaConsumer(
        *topics,
        **connection_options(settings),
        group_id=group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level=settings.isolation_level,
        metadata_max_age_ms=settings.metadata_max_age_ms,
    )


def make_admin(settings: KafkaSettings) -> KafkaAdminClient:
    return KafkaAdminClient(**connection_options(settings))


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
