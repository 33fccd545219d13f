"""Follow a registry alias (e.g. policy@production) and swap the served version when it moves.

The registry's alias file is the source of truth and is polled every few seconds. When
Kafka is reachable, ModelEvents on tuneloop.models.v1 wake the poller at once: a promotion
is picked up within the time it takes to load the model, and a lost event only delays it
to the next poll. A version that failed to load is not retried until the alias moves again.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable

from google.protobuf.message import DecodeError
from kafka.errors import KafkaError

from tuneloop.common.broker import serves
from tuneloop.common.kafka import MODELS_TOPIC, KafkaSettings, client_security, ensure_topics, make_consumer
from tuneloop.common.kafka_acls import MODEL_WATCH_GROUP_PREFIX
from tuneloop.common.registry import Registry, RegistryError
from tuneloop.v1 import model_event_pb2

log = logging.getLogger(__name__)


class AliasWatcher:
    """Calls `on_change(version)` from its own thread each time `name@alias` points elsewhere."""

    def __init__(
        self,
        registry: Registry,
        name: str,
        alias: str,
        current: str,
        on_change: Callable[[str], None],
        *,
        interval_s: float = 2.0,
        kafka: KafkaSettings | None = None,
    ) -> None:
        self._registry = registry
        self.name = name
        self.alias = alias
        self._current = current
        self._failed: str | None = None
        self._on_change = on_change
        self._interval_s = interval_s
        self._kafka = kafka
        self._stop = threading.Event()
        self._wake = threading.Event()
        self.events_ready = threading.Event()  # set once the event consumer has its partitions
        self._threads = [threading.Thread(target=self._poll, name="alias-watch", daemon=True)]
        if kafka is not None:
            self._threads.append(threading.Thread(target=self._consume, name="model-events", daemon=True))

    def start(self) -> AliasWatcher:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        for thread in self._threads:
            thread.join(timeout=10)

    def check(self) -> None:
        """Compare the alias with the served version once; swap if it moved."""
        try:
            version = self._registry.current(self.name, self.alias)
        except (RegistryError, OSError, ValueError) as err:
            log.warning("alias watch: cannot read alias", extra={"fields": {"error": str(err)}})
            return
        if version is None or version in (self._current, self._failed):
            return
        log.info("alias moved", extra={"fields": {"alias": f"{self.name}@{self.alias}", "version": version}})
        try:
            self._on_change(version)
        except Exception as err:  # keep serving the old version; retry when the alias moves again
            log.exception("swap failed", extra={"fields": {"version": version, "error": str(err)}})
            self._failed = version
            return
        self._current = version
        self._failed = None

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.check()
            self._wake.wait(self._interval_s)
            self._wake.clear()

    def _consume(self) -> None:
        """Wake the poller on ModelEvents about our alias; keep trying while Kafka is away."""
        assert self._kafka is not None
        consumer = None
        brokers = [b.strip() for b in self._kafka.bootstrap_servers.split(",") if b.strip()]
        while not self._stop.is_set():
            if consumer is None:
                if not any(serves(b, timeout_s=2.0, security=client_security(self._kafka)) for b in brokers):
                    self._stop.wait(self._interval_s)
                    continue
                try:
                    ensure_topics(self._kafka, [MODELS_TOPIC])
                    # A group of its own: every replica must see every event. Nothing is
                    # committed, so the broker forgets the group once it is gone.
                    group = f"{MODEL_WATCH_GROUP_PREFIX}{uuid.uuid4().hex[:12]}"
                    consumer = make_consumer(self._kafka, group, [MODELS_TOPIC])
                except KafkaError as err:
                    log.warning("model events: Kafka not usable", extra={"fields": {"error": str(err)}})
                    self._stop.wait(self._interval_s)
                    continue
            try:
                batches = consumer.poll(timeout_ms=500)
            except KafkaError as err:
                log.warning("model events: poll failed", extra={"fields": {"error": str(err)}})
                continue
            if consumer.assignment():
                self.events_ready.set()
            for records in batches.values():
                for record in records:
                    if self._concerns_us(record.value):
                        self._wake.set()
        if consumer is not None:
            consumer.close()

    def _concerns_us(self, value: bytes) -> bool:
        try:
            event = model_event_pb2.ModelEvent.FromString(value)
        except DecodeError:  # a foreign or broken payload is not our business
            return False
        return event.name == self.name and event.alias == self.alias
