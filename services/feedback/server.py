"""The Feedback gRPC service: validates feedback events and writes them to Kafka.

An event is acknowledged ACCEPTED only once the broker has it (idempotent producer,
acks=all). A Kafka failure answers UNAVAILABLE for the whole call: the client retries with
the same event ids, which is safe because accepted ids come back as DUPLICATE here and the
preference store deduplicates by event id in any case. The producer is librdkafka's
(`tuneloop.common.native_producer`): this is the one hot Kafka path of the platform.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence

import grpc
import prometheus_client
from prometheus_client import Histogram

from tuneloop.common.errors import FieldError, abort_invalid
from tuneloop.common.grpc_server import GrpcServer, serving_options
from tuneloop.common.kafka import KafkaSettings, ensure_topics
from tuneloop.common.native_producer import DeliveryFailed, NativeProducer
from tuneloop.common.logs import configure_logging
from tuneloop.common.settings import load_or_exit
from tuneloop.feedback.dedup import RecentIds, warm_from_topic
from tuneloop.feedback.settings import FeedbackSettings
from tuneloop.feedback.validation import Limits, field_label, fill_item_id, validate
from tuneloop.v1 import feedback_pb2, feedback_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = feedback_pb2.DESCRIPTOR.services_by_name["Feedback"].full_name

# Module level: tests run several servers in one process, and a metric registers once.
EVENTS = prometheus_client.Counter(
    "tuneloop_feedback_events_total",
    "Feedback events handled, by judgement kind and outcome (accepted, duplicate, rejected, unavailable).",
    ["kind", "status"],
)
REJECTIONS = prometheus_client.Counter(
    "tuneloop_feedback_rejections_total",
    "Rejected feedback events by offending field path (list indexes dropped).",
    ["field"],
)
PRODUCE_SECONDS = Histogram(
    "tuneloop_feedback_produce_duration_seconds",
    "From handing a call's events to the producer until the broker acknowledged all of them.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)

_ACCEPTED = feedback_pb2.SUBMIT_STATUS_ACCEPTED
_DUPLICATE = feedback_pb2.SUBMIT_STATUS_DUPLICATE
_REJECTED = feedback_pb2.SUBMIT_STATUS_REJECTED


def _kind(event: feedback_pb2.FeedbackEvent) -> str:
    return event.WhichOneof("judgement") or "none"


class _Acks:
    """The deliveries one call waits for. Callbacks run in the producer's delivery thread.

    A record that lands is remembered in `recent` at once, also after its call answered
    UNAVAILABLE: the client's retry then gets DUPLICATE instead of producing a second copy.
    """

    def __init__(self, recent: RecentIds) -> None:
        self.recent = recent
        self.delivered: Counter[str] = Counter()
        self.error: Exception | None = None
        self._waiting = 0
        self._sealed = False
        self._lock = threading.Lock()
        self._done = threading.Event()

    def expect(self, event_id: str, kind: str) -> Callable[[Exception | None], None]:
        with self._lock:
            self._waiting += 1

        def delivered(error: Exception | None) -> None:
            if error is None:
                self.recent.add(event_id)
            with self._lock:
                self._waiting -= 1
                if error is None:
                    self.delivered[kind] += 1
                elif self.error is None:
                    self.error = error
                if self.error is not None or (self._sealed and self._waiting == 0):
                    self._done.set()

        return delivered

    def landed(self) -> Counter[str]:
        """Records acknowledged so far, by kind."""
        with self._lock:
            return Counter(self.delivered)

    def wait(self, timeout_s: float) -> Exception | None:
        """The first delivery error, or a timeout error, or None once every record landed."""
        with self._lock:
            self._sealed = True
            if self._waiting == 0 or self.error is not None:
                self._done.set()
        if not self._done.wait(timeout_s):
            return DeliveryFailed(f"not acknowledged within {timeout_s:.1f} s")
        return self.error


class FeedbackService(feedback_pb2_grpc.FeedbackServicer):
    def __init__(self, settings: FeedbackSettings, producer: NativeProducer, recent: RecentIds) -> None:
        self.settings = settings
        self.producer = producer
        self.recent = recent
        self.limits = Limits(
            max_clock_skew_s=settings.max_clock_skew_s,
            max_id_chars=settings.max_id_chars,
            max_comment_chars=settings.max_comment_chars,
            max_criteria=settings.max_criteria,
            max_marks=settings.max_marks,
            max_ranked=settings.max_ranked,
        )

    def Submit(self, request: feedback_pb2.FeedbackEvent, context: grpc.ServicerContext) -> feedback_pb2.SubmitResult:
        (result,) = self._submit([request], context)
        if result.status == _REJECTED:
            abort_invalid(context, FieldError(result.field, result.reason))
        return result

    def SubmitBatch(
        self, request: feedback_pb2.SubmitBatchRequest, context: grpc.ServicerContext
    ) -> feedback_pb2.SubmitBatchResponse:
        if not request.events:
            abort_invalid(context, FieldError("events", "no events"))
        if len(request.events) > self.settings.max_batch_events:
            abort_invalid(context, FieldError("events", f"more than {self.settings.max_batch_events} events"))
        return feedback_pb2.SubmitBatchResponse(results=self._submit(request.events, context))

    def SubmitStream(
        self, request_iterator: Iterator[feedback_pb2.FeedbackEvent], context: grpc.ServicerContext
    ) -> feedback_pb2.SubmitBatchResponse:
        # The whole stream is read before anything is produced, so a stream refused for its
        # length leaves nothing behind in Kafka; the cap bounds the memory this takes.
        events: list[feedback_pb2.FeedbackEvent] = []
        for event in request_iterator:
            if len(events) == self.settings.max_batch_events:
                abort_invalid(context, FieldError("events", f"more than {self.settings.max_batch_events} events"))
            events.append(event)
        return feedback_pb2.SubmitBatchResponse(results=self._submit(events, context))

    def GetAgreement(
        self, request: feedback_pb2.AgreementRequest, context: grpc.ServicerContext
    ) -> feedback_pb2.AgreementReport:
        # Imported on first use: it brings the store's Parquet stack, which ingestion never needs.
        from tuneloop.store import agreement

        if not request.tenant:
            abort_invalid(context, FieldError("tenant", "required: agreement is measured within one tenant"))
        return agreement.report(self.settings.store_root, request.tenant, request.project, request.calibration_only)

    def close(self) -> None:
        """Deliver what the producer still holds (records of calls that timed out), then close it."""
        undelivered = self.producer.close(self.settings.produce_timeout_s)
        if undelivered:
            log.warning("producer closed with records undelivered", extra={"fields": {"records": undelivered}})

    def _submit(
        self, events: Sequence[feedback_pb2.FeedbackEvent], context: grpc.ServicerContext
    ) -> list[feedback_pb2.SubmitResult]:
        """Validate each event, produce the valid new ones, wait for every ack, answer in order."""
        now = time.time()
        results = [feedback_pb2.SubmitResult(event_id=event.event_id) for event in events]
        sent: list[tuple[feedback_pb2.SubmitResult, str]] = []
        acks = _Acks(self.recent)
        in_call: set[str] = set()
        start = time.perf_counter()
        for event, result in zip(events, results, strict=True):
            kind = _kind(event)
            try:
                validate(event, now, self.limits)
            except FieldError as err:
                result.status, result.field, result.reason = _REJECTED, err.field, err.reason
                EVENTS.labels(kind, "rejected").inc()
                REJECTIONS.labels(field_label(err.field)).inc()
                continue
            if event.event_id in in_call or event.event_id in self.recent:
                result.status = _DUPLICATE
                EVENTS.labels(kind, "duplicate").inc()
                continue
            in_call.add(event.event_id)
            try:
                self._produce(event, acks.expect(event.event_id, kind))
            except DeliveryFailed as err:
                self._abort_unavailable(context, sent, acks, err)
            sent.append((result, kind))
        self._await_acks(context, sent, acks, start)
        return results

    def _produce(self, event: feedback_pb2.FeedbackEvent, on_delivery: Callable[[Exception | None], None]) -> None:
        # The request message is this call's own, so it is completed in place: a copy per
        # event cost as much as its validation.
        fill_item_id(event)
        # Key = item id. Every judgement of one item (each annotator's, a corrected one, each
        # calibration round's) then lands in one partition in the order it was accepted, so
        # the store reads them in that order ("an annotator's latest judgement of an item"
        # means the latest accepted). The event names completions, not their prompt, and the
        # item id is the stable name of what is judged (by default the sorted completion ids,
        # so A/B shown swapped is the same key); an item gets a handful of judgements, so no
        # key grows hot enough to skew the partitions.
        self.producer.send(self.settings.topic, event.item_id.encode(), event.SerializeToString(), on_delivery)

    def _await_acks(
        self,
        context: grpc.ServicerContext,
        sent: list[tuple[feedback_pb2.SubmitResult, str]],
        acks: _Acks,
        start: float,
    ) -> None:
        if not sent:
            return
        error = acks.wait(self.settings.produce_timeout_s)
        if error is not None:
            self._abort_unavailable(context, sent, acks, error)
        PRODUCE_SECONDS.observe(time.perf_counter() - start)
        accepted: Counter[str] = Counter()
        for result, kind in sent:
            result.status = _ACCEPTED
            accepted[kind] += 1
        # One increment per kind and call: a labelled child's lookup per event showed in profiles.
        for kind, count in accepted.items():
            EVENTS.labels(kind, "accepted").inc(count)

    def _abort_unavailable(
        self,
        context: grpc.ServicerContext,
        sent: Sequence[tuple[feedback_pb2.SubmitResult, str]],
        acks: _Acks,
        err: Exception,
    ) -> None:
        # What landed by now counts as accepted (a retry will be answered DUPLICATE), the rest
        # as unavailable; records still in flight may land later and are remembered then.
        landed = acks.landed()
        for kind, count in Counter(kind for _result, kind in sent).items():
            accepted = min(count, landed[kind])
            EVENTS.labels(kind, "accepted").inc(accepted)
            EVENTS.labels(kind, "unavailable").inc(count - accepted)
        log.warning("kafka did not acknowledge", extra={"fields": {"error": repr(err), "topic": self.settings.topic}})
        context.abort(
            grpc.StatusCode.UNAVAILABLE,
            f"feedback not acknowledged by Kafka ({type(err).__name__}); retry with the same event ids",
        )


def build_server(settings: FeedbackSettings, kafka: KafkaSettings) -> GrpcServer:
    """A Feedback server bound to its ports, connected to Kafka, not yet started."""
    if settings.create_topic:
        ensure_topics(kafka, [settings.topic])
    producer = NativeProducer(kafka)
    try:
        # Fetch the topic's metadata now: a missing topic fails the start instead of the
        # first call.
        producer.partitions_for(settings.topic, timeout_s=kafka.request_timeout_ms / 1000)
        recent = RecentIds(settings.dedup_window_size, settings.dedup_ttl_s)
        if settings.warm_dedup_records and settings.dedup_window_size:
            loaded = warm_from_topic(recent, kafka, settings.topic, settings.warm_dedup_records)
            log.info("dedup window warmed", extra={"fields": {"records": loaded, "ids": len(recent)}})
        service = FeedbackService(settings, producer, recent)

        def register(server: grpc.Server) -> list[str]:
            feedback_pb2_grpc.add_FeedbackServicer_to_server(service, server)
            return [SERVICE_NAME]

        return GrpcServer("feedback", register, **serving_options(settings), on_stop=service.close)
    except BaseException:
        producer.close(0)
        raise


def main(port: int | None = None, metrics_port: int | None = None) -> None:
    """`tuneloop serve feedback`: serve until SIGTERM, then drain calls and flush the producer."""
    settings = load_or_exit(FeedbackSettings, port=port, metrics_port=metrics_port)
    kafka = load_or_exit(KafkaSettings)
    configure_logging("feedback", settings.log_level)
    build_server(settings, kafka).run_forever()
