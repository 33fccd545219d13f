"""Registry events to Kafka: the registry's `on_event` hook, publishing ModelEvents on
tuneloop.models.v1 (keyed by model name) so serving services swap without polling.

The alias file stays the source of truth; a lost event only delays a swap (services also
poll the registry), so a failed send is logged by the registry and never undoes a promotion.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from google.protobuf.timestamp_pb2 import Timestamp

from tuneloop.common.kafka import MODELS_TOPIC, KafkaSettings, ensure_topics, make_producer
from tuneloop.common.registry import EventType, Registry
from tuneloop.v1 import model_event_pb2

_TYPES = {
    "registered": model_event_pb2.MODEL_EVENT_TYPE_REGISTERED,
    "promoted": model_event_pb2.MODEL_EVENT_TYPE_PROMOTED,
    "rolled_back": model_event_pb2.MODEL_EVENT_TYPE_ROLLED_BACK,
}


class KafkaModelEvents:
    """Callable registry listener; the producer is created on first use and closed by `close`."""

    def __init__(self, bootstrap_servers: str, registry_root: str, timeout_s: float = 30.0) -> None:
        self.settings = KafkaSettings(bootstrap_servers=bootstrap_servers)
        self.registry = Registry(registry_root)
        self.timeout_s = timeout_s
        self._producer = None

    def __call__(self, event: EventType, name: str, version: str, alias: str | None, previous: str | None) -> None:
        if self._producer is None:
            ensure_topics(self.settings, [MODELS_TOPIC])
            self._producer = make_producer(self.settings)
        created = Timestamp()
        created.FromDatetime(datetime.now(UTC))
        message = model_event_pb2.ModelEvent(
            event_id=uuid.uuid4().hex,
            type=_TYPES[event],
            name=name,
            version=version,
            alias=alias or "",
            previous_version=previous or "",
            kind=self.registry.card(f"{name}@{version}").kind,
            created_at=created,
        )
        # Wait for the broker's ack: the Job may exit right after promoting.
        self._producer.send(MODELS_TOPIC, key=name.encode(), value=message.SerializeToString()).get(
            timeout=self.timeout_s
        )

    def close(self) -> None:
        if self._producer is not None:
            self._producer.close(timeout=self.timeout_s)
            self._producer = None
