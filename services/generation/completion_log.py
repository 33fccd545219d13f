"""The completion log: every completion served becomes a CompletionRecord on Kafka.

Records leave the response path at once: the RPC thread puts them on an in-memory queue
and one publisher thread sends them (idempotent producer, acks=all, key = conversation id).
When Kafka does not acknowledge in time the records go to the local spool, and so does
every later record until the spool is empty again, so records reach Kafka in the order
they were served. On start the spool left by an earlier process is flushed before anything
new.

The rule: no completion is served without its record reaching Kafka eventually. So when
the spool is full (Kafka down for long), the service refuses new requests with UNAVAILABLE
(`accepting` is False) instead of serving answers nobody could ever trace; requests already
admitted still spool their records, so the file may pass its bound by what is in flight.
A hard kill loses only what sits in the in-memory queue (milliseconds of records); a clean
shutdown publishes or spools it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

from kafka import KafkaProducer
from kafka.errors import KafkaError

from tuneloop.common.kafka import COMPLETIONS_TOPIC, KafkaSettings, any_broker_serves, ensure_topics, make_producer
from tuneloop.generation import metrics
from tuneloop.generation.spool import Spool
from tuneloop.v1 import completion_pb2

log = logging.getLogger(__name__)

_BATCH = 500
_STOP = object()


class CompletionLog:
    """Publishes CompletionRecords to Kafka in the background, spooling while Kafka is away."""

    def __init__(
        self,
        kafka: KafkaSettings,
        spool: Spool,
        *,
        topic: str = COMPLETIONS_TOPIC,
        send_timeout_s: float = 5.0,
        retry_s: float = 2.0,
    ) -> None:
        self._spool = spool
        self._topic = topic
        self._send_timeout_s = send_timeout_s
        self._retry_s = retry_s
        # Records give up after send_timeout_s (then they are spooled) instead of retrying
        # for the default two minutes while newer records pile up behind them.
        timeout_ms = int(send_timeout_s * 1000)
        self._kafka = kafka.model_copy(
            update={
                "delivery_timeout_ms": timeout_ms,
                "request_timeout_ms": min(kafka.request_timeout_ms, max(1, timeout_ms - kafka.linger_ms - 1)),
            }
        )
        self._queue: queue.Queue[object] = queue.Queue()
        self._producer: KafkaProducer | None = None
        self._next_attempt = 0.0
        self._topic_ready = False
        self._thread = threading.Thread(target=self._run, name="completion-log", daemon=True)
        self._update_gauges()

    # ---- RPC side --------------------------------------------------------------------
    @property
    def accepting(self) -> bool:
        """False while the spool is full: serving more would create untraceable answers."""
        return not self._spool.full

    @property
    def pending(self) -> int:
        """Records served but not yet acknowledged by Kafka."""
        return self._queue.qsize() + self._spool.pending

    def publish(self, record: completion_pb2.CompletionRecord) -> None:
        self._queue.put((record.conversation_id.encode(), record.SerializeToString()))
        metrics.QUEUE_RECORDS.set(self._queue.qsize())

    # ---- lifecycle -------------------------------------------------------------------
    def start(self) -> CompletionLog:
        self._thread.start()
        return self

    def close(self, timeout_s: float = 10.0) -> None:
        """Publish what is queued if Kafka answers within `timeout_s`, spool the rest."""
        self._queue.put(_STOP)
        self._thread.join(timeout_s + self._send_timeout_s + 5)
        leftovers = self._take_all()
        if leftovers:
            self._spool_records(leftovers)
        if self._producer is not None:
            self._producer.close(timeout=1)
            self._producer = None
        self._spool.close()

    # ---- publisher thread ------------------------------------------------------------
    def _run(self) -> None:
        stopping = False
        while True:
            if self._spool.pending and self._connected():
                self._flush_spool()
            items, stopping = self._take(stopping)
            if items:
                if self._spool.pending or not self._connected():
                    self._spool_records(items)  # behind the older spooled records: order kept
                else:
                    failed = self._send(items)
                    if failed:
                        self._spool_records(failed)
            if stopping and self._queue.empty():
                if self._spool.pending and self._connected():
                    self._flush_spool()
                return

    def _take(self, stopping: bool) -> tuple[list[tuple[bytes, bytes]], bool]:
        """Waits up to 0.2 s for a record, then takes up to a batch of what is queued."""
        items: list[tuple[bytes, bytes]] = []
        try:
            first = self._queue.get(timeout=0.2)
        except queue.Empty:
            return items, stopping
        for item in [first, *self._drain(_BATCH - 1)]:
            if item is _STOP:
                stopping = True
            else:
                items.append(item)  # type: ignore[arg-type]
        metrics.QUEUE_RECORDS.set(self._queue.qsize())
        return items, stopping

    def _drain(self, limit: int) -> list[object]:
        out: list[object] = []
        while len(out) < limit:
            try:
                out.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return out

    def _take_all(self) -> list[tuple[bytes, bytes]]:
        return [item for item in self._drain(1 << 62) if item is not _STOP]  # type: ignore[misc]

    def _connected(self) -> bool:
        """Whether a producer is ready; (re)connects at most every `retry_s` while Kafka is away."""
        if self._producer is not None:
            return True
        now = time.monotonic()
        if now < self._next_attempt:
            return False
        self._next_attempt = now + self._retry_s
        # Probe first: creating a producer against a dead broker blocks for 30 s.
        if not any_broker_serves(self._kafka, timeout_s=min(2.0, self._retry_s)):
            return False
        try:
            if not self._topic_ready:
                ensure_topics(self._kafka, [self._topic])
                self._topic_ready = True
            self._producer = make_producer(self._kafka)
        except KafkaError as err:
            log.warning("completion log: Kafka not usable yet", extra={"fields": {"error": str(err)}})
            return False
        log.info("completion log: connected to Kafka", extra={"fields": {"spooled": self._spool.pending}})
        return True

    def _disconnect(self, reason: str) -> None:
        log.warning("completion log: Kafka unavailable, spooling", extra={"fields": {"error": reason}})
        if self._producer is not None:
            try:
                self._producer.close(timeout=0)
            except KafkaError:
                pass
        self._producer = None
        self._next_attempt = time.monotonic() + self._retry_s

    def _send(self, items: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        """Sends and waits for acknowledgements; returns the records that were not acknowledged."""
        assert self._producer is not None
        futures = []
        try:
            for key, value in items:
                futures.append(self._producer.send(self._topic, key=key, value=value))
            self._producer.flush(timeout=self._send_timeout_s + 2)
        except KafkaError as err:
            self._disconnect(str(err))
        failed = [item for item, f in zip(items, futures, strict=False) if not (f.is_done and f.succeeded())]
        failed += items[len(futures) :]
        acked = len(items) - len(failed)
        metrics.PUBLISHED.inc(acked)
        if failed and self._producer is not None:
            errors = {str(f.exception) for f in futures if f.is_done and f.failed()}
            self._disconnect("; ".join(sorted(errors)) or "no acknowledgement in time")
        return failed

    def _spool_records(self, items: list[tuple[bytes, bytes]]) -> None:
        # The record carries its key (conversation_id): the spool stores values only.
        self._spool.append([value for _, value in items])
        metrics.SPOOLED.inc(len(items))
        self._update_gauges()

    def _flush_spool(self) -> None:
        while self._spool.pending and self._producer is not None:
            values, end = self._spool.read(_BATCH)
            if not values:
                break
            items = []
            for value in values:
                record = completion_pb2.CompletionRecord.FromString(value)
                items.append((record.conversation_id.encode(), value))
            failed = self._send(items)
            if failed:
                # Only a fully acknowledged read is committed; the rest is sent again later.
                break
            self._spool.commit(end, len(values))
            self._update_gauges()
        if not self._spool.pending:
            log.info("completion log: spool flushed")

    def _update_gauges(self) -> None:
        metrics.SPOOL_RECORDS.set(self._spool.pending)
        metrics.SPOOL_BYTES.set(self._spool.size)
