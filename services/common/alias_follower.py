"""Follow a registry alias (e.g. policy@production) and hand each new version to a callback.

The registry's alias file is the source of truth and is polled every few seconds. When Kafka
is configured, ModelEvents on tuneloop.models.v1 wake the poller at once: a promotion is
picked up within the time it takes to load the model, and a lost event only delays it to
the next poll. A version whose swap failed is not retried until the alias moves again, and
an alias file that cannot be read is logged and read again at the next poll: what is served
keeps being served.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from google.protobuf.message import DecodeError
from kafka.errors import KafkaError

from tuneloop.common.kafka import MODELS_TOPIC, KafkaSettings, any_broker_serves, ensure_topics, make_consumer
from tuneloop.common.registry import LATEST, Registry, RegistryError
from tuneloop.v1 import model_event_pb2

log = logging.getLogger(__name__)


class AliasFollower:
    """Calls `on_change(version)` each time `name@tag` points elsewhere than `current`.

    `tag` is an alias or `latest`. `check()` compares once in the calling thread; `start()`
    keeps comparing from a thread of its own. Model events are consumed in the Kafka group
    `group_id`: one per process, so that every replica sees every event (nothing is
    committed, so the broker forgets the group once it is gone).
    """

    def __init__(
        self,
        registry: Registry,
        name: str,
        tag: str,
        current: str | None,
        on_change: Callable[[str], None],
        *,
        interval_s: float = 2.0,
        kafka: KafkaSettings | None = None,
        group_id: str | None = None,
    ) -> None:
        if kafka is not None and not group_id:
            raise ValueError("following model events needs a consumer group id")
        self._registry = registry
        self.name = name
        self.tag = tag
        self._current = current
        self._failed: str | None = None
        self._on_change = on_change
        self._interval_s = interval_s
        self._kafka = kafka
        self._group_id = group_id
        self._checking = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self.events_ready = threading.Event()  # set once the event consumer has its partitions
        self._threads = [threading.Thread(target=self._poll, name="alias-follow", daemon=True)]
        if kafka is not None:
            self._threads.append(threading.Thread(target=self._consume, name="model-events", daemon=True))

    @property
    def current(self) -> str | None:
        """The version last handed over successfully (or the one it started from)."""
        return self._current

    def start(self) -> AliasFollower:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        for thread in self._threads:
            if thread.is_alive():
                thread.join(timeout=10)

    def check(self) -> bool:
        """Compare the alias with the current version once; True if a new one was handed over."""
        with self._checking:  # a start-up check and the poller never swap at the same time
            try:
                version = self._target()
            except (RegistryError, OSError, ValueError) as err:
                log.warning("alias follow: cannot read alias", extra={"fields": {"error": str(err)}})
                return False
            if version is None or version in (self._current, self._failed):
                return False
            log.info("alias moved", extra={"fields": {"alias": f"{self.name}@{self.tag}", "version": version}})
            try:
                self._on_change(version)
            except Exception as err:  # keep serving the old version; retry when the alias moves again
                log.exception("swap failed", extra={"fields": {"version": version, "error": str(err)}})
                self._failed = version
                return False
            self._current = version
            self._failed = None
            return True

    def _target(self) -> str | None:
        if self.tag == LATEST:
            versions = self._registry.versions(self.name)
            return versions[-1] if versions else None
        return self._registry.current(self.name, self.tag)

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.check()
            self._wake.wait(self._interval_s)
            self._wake.clear()

    def _consume(self) -> None:
        """Wake the poller on ModelEvents about our alias; keep trying while Kafka is away."""
        assert self._kafka is not None and self._group_id is not None
        consumer = None
        while not self._stop.is_set():
            if consumer is None:
                if not any_broker_serves(self._kafka):
                    self._stop.wait(self._interval_s)
                    continue
                try:
                    ensure_topics(self._kafka, [MODELS_TOPIC])
                    consumer = make_consumer(self._kafka, self._group_id, [MODELS_TOPIC])
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
        # `latest` moves with every registration, which names no alias.
        return event.name == self.name and (event.alias == self.tag or self.tag == LATEST)
