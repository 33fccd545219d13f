"""The window of recently accepted event ids that lets Feedback answer DUPLICATE.

This window is a fast path, not the guarantee. It is per process, bounded, forgets after a
TTL and starts (nearly) empty after a restart, and two concurrent submissions of one id may
both pass it. Exactly-once holds end to end because the preference store deduplicates by
event id as it consumes; the window only spares Kafka and the store the copies a retrying
client would otherwise produce, and tells the client its retry was not needed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from cachetools import TLRUCache
from google.protobuf.message import DecodeError
from kafka import KafkaConsumer, TopicPartition

from tuneloop.common.kafka import KafkaSettings, connection_options
from tuneloop.v1 import feedback_pb2

log = logging.getLogger(__name__)


class RecentIds:
    """Event ids accepted within the last `ttl_s` seconds, at most `capacity` of them (LRU).

    Thread-safe. Times are Unix seconds so ids read back from Kafka can keep their age: each id
    expires `ttl_s` after it was accepted, not after it entered the window.
    """

    def __init__(self, capacity: int, ttl_s: float, clock: Callable[[], float] = time.time) -> None:
        self.capacity = capacity
        self.ttl_s = ttl_s
        self._clock = clock
        # id -> when it was accepted; a lookup counts as a use (LRU order).
        self._accepted: TLRUCache[str, float] = TLRUCache(
            max(capacity, 1), ttu=lambda _id, accepted_at, _now: accepted_at + ttl_s, timer=clock
        )
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._accepted)

    def __contains__(self, event_id: str) -> bool:
        with self._lock:
            return self._accepted.get(event_id) is not None

    def add(self, event_id: str, accepted_at: float | None = None) -> None:
        """Remember an accepted id (`accepted_at` defaults to now); evict the least recent."""
        if self.capacity == 0:
            return
        at = self._clock() if accepted_at is None else accepted_at
        with self._lock:
            if self._clock() - at > self.ttl_s:
                return
            self._accepted[event_id] = max(at, self._accepted.get(event_id, at))


def warm_from_topic(
    recent: RecentIds, kafka: KafkaSettings, topic: str, per_partition: int, timeout_s: float = 30.0
) -> int:
    """Read the newest `per_partition` records of each partition into `recent`; return how many.

    After a restart this keeps answering DUPLICATE to clients retrying what the previous
    process accepted. Best effort: it stops at `timeout_s`, the window being only a fast path.
    """
    # No group: a start-up read of the tail must not join or disturb any consumer group.
    consumer = KafkaConsumer(
        **connection_options(kafka), group_id=None, enable_auto_commit=False, isolation_level=kafka.isolation_level
    )
    loaded = 0
    try:
        partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))]
        consumer.assign(partitions)
        begins, ends = consumer.beginning_offsets(partitions), consumer.end_offsets(partitions)
        for tp in partitions:
            consumer.seek(tp, max(begins[tp], ends[tp] - per_partition))
        pending = [tp for tp in partitions if consumer.position(tp) < ends[tp]]
        deadline = time.monotonic() + timeout_s
        while pending and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=500).values():
                for record in records:
                    try:
                        event_id = feedback_pb2.FeedbackEvent.FromString(record.value).event_id
                    except DecodeError:
                        continue
                    recent.add(event_id, accepted_at=record.timestamp / 1000)
                    loaded += 1
            pending = [tp for tp in pending if consumer.position(tp) < ends[tp]]
        if pending:
            log.warning("dedup warm-up stopped early", extra={"fields": {"topic": topic, "loaded": loaded}})
    finally:
        consumer.close()
    return loaded
