"""An idempotent Kafka producer on librdkafka (confluent-kafka), for the ingestion hot path.

kafka-python does per-record work in Python under the interpreter lock: in a profile of the
Feedback service under load its `send` and sender thread took nearly half the lock, and the
service reached about 0.3 of Kafka's Java producer (`bench/bench_store.py`). librdkafka
batches, compresses, partitions and retries in native threads, so the Python side of a record
is one `produce` call and one delivery callback. Every other client of ours stays on
kafka-python (`tuneloop.common.kafka`): their streams are small and they need its consumer
group, transaction and admin APIs.

The settings are the same `KafkaSettings`, mapped to librdkafka's names, with the same
guarantees as `make_producer`: idempotence, acks from all in-sync replicas, up to 5 requests
in flight without reordering, and murmur2 partitioning of keys like the Java client and
kafka-python (librdkafka's own default hashes keys differently, so one item's events would
land in another partition than other producers put them).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from confluent_kafka import KafkaException, Producer

from tuneloop.common.kafka import KafkaSettings

log = logging.getLogger(__name__)


class DeliveryFailed(Exception):
    """The broker did not take a record (or will not in time): the caller answers UNAVAILABLE."""


def native_options(settings: KafkaSettings) -> dict[str, Any]:
    """librdkafka's names for the producer options `make_producer` gives kafka-python."""
    options: dict[str, Any] = {
        "bootstrap.servers": settings.bootstrap_servers,
        "client.id": settings.client_id,
        "enable.idempotence": True,
        "acks": "all",
        "max.in.flight.requests.per.connection": 5,
        "linger.ms": settings.linger_ms,
        "batch.size": settings.batch_size,
        "delivery.timeout.ms": settings.delivery_timeout_ms,
        "request.timeout.ms": settings.request_timeout_ms,
        "reconnect.backoff.max.ms": settings.reconnect_backoff_max_ms,
        "partitioner": "murmur2_random",
        "security.protocol": settings.security_protocol.lower(),
    }
    if settings.security_protocol.endswith("SSL"):
        options["ssl.endpoint.identification.algorithm"] = "https" if settings.ssl_check_hostname else "none"
        for name, option in (("ssl_cafile", "ssl.ca.location"), ("ssl_certfile", "ssl.certificate.location"),
                             ("ssl_keyfile", "ssl.key.location")):
            if (path := getattr(settings, name)) is not None:
                options[option] = str(path)
    if settings.security_protocol.startswith("SASL_"):
        options.update({
            "sasl.mechanism": settings.sasl_mechanism,
            "sasl.username": settings.sasl_username,
            "sasl.password": settings.sasl_secret(),
        })
    return options


class NativeProducer:
    """`send` hands a record to librdkafka and returns at once; `on_delivery(error)` runs in
    this producer's polling thread once the broker acknowledged it (error None) or it failed."""

    def __init__(self, settings: KafkaSettings) -> None:
        # librdkafka's own log lines go through this logger (served by poll), not to stderr.
        self._producer = Producer({**native_options(settings), "logger": log})
        self._closing = threading.Event()
        self._poller = threading.Thread(target=self._poll, name="kafka-delivery", daemon=True)
        self._poller.start()

    def _poll(self) -> None:
        while not self._closing.is_set():
            try:
                self._producer.poll(0.05)
            except Exception:  # a failing callback must not stop every later delivery report
                log.exception("a delivery callback failed")

    def send(self, topic: str, key: bytes, value: bytes, on_delivery: Callable[[Exception | None], None]) -> None:
        def delivered(error: Any, _message: Any) -> None:
            on_delivery(None if error is None else DeliveryFailed(error.str()))

        try:
            self._producer.produce(topic, value=value, key=key, on_delivery=delivered)
        except (BufferError, KafkaException) as err:  # local queue full, or the topic is unknown
            raise DeliveryFailed(str(err)) from err

    def partitions_for(self, topic: str, timeout_s: float) -> int:
        """The topic's partition count, fetched from the brokers (fails if it does not exist)."""
        try:
            metadata = self._producer.list_topics(topic, timeout=timeout_s).topics[topic]
        except KafkaException as err:
            raise DeliveryFailed(f"no metadata for {topic}: {err}") from err
        if metadata.error is not None:
            raise DeliveryFailed(f"topic {topic}: {metadata.error.str()}")
        return len(metadata.partitions)

    def close(self, timeout_s: float) -> int:
        """Deliver what is still queued within `timeout_s`; returns how many records were not."""
        self._closing.set()
        self._poller.join()
        return self._producer.flush(timeout_s)
