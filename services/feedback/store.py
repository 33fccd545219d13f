"""The preference store: consumes feedback events and completion records from Kafka and
materialises them, exactly once, into training rows and raw judgements (Parquet; layout
and snapshots in snapshot.py).

One event's path: its record is read from tuneloop.feedback.v1 → parsed and checked → its
completion ids are looked up in the completion index (filled from tuneloop.completions.v1)
→ the pair rules (pairs.py) turn it into rows → a commit writes the rows' Parquet file
durably, then one SQLite transaction records the file in the manifest together with the
event id (dedup set), the completions, the pending buffer and the consumed positions →
only then are the Kafka offsets committed.

Exactly once: the store is the single writer of its root (a file lock) and assigns itself
every partition of both topics, starting from the positions recorded in its own last
commit, not from Kafka's: a crash anywhere before the SQLite commit replays the batch, a
crash after it replays nothing. The group's committed offsets (group `tuneloop-store`)
mirror those positions so lag shows in the usual Kafka tooling. The dedup set by event id
stops an event that was sent twice (two offsets, one event id) from being stored twice.

Feedback whose completion record has not arrived yet is parked in the pending table (in
the same transaction, so it survives restarts) and retried every batch; after
`join_timeout_s` from when the store first read it, it is dead-lettered. Nothing is dropped
silently: an unusable record goes to tuneloop.feedback.dlq.v1 as a DeadLetter naming the
field and the reason. Dead letters are sent (and acknowledged) before the commit, so a
crash in between can send one twice; each carries its source topic/partition/offset, which
identifies it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import pyarrow as pa
from google.protobuf.message import DecodeError
from kafka import TopicPartition
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata
from prometheus_client import Counter, Gauge, Histogram
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from tuneloop.common.grpc_server import GrpcServer
from tuneloop.common.kafka import (
    COMPLETIONS_TOPIC,
    FEEDBACK_DLQ_TOPIC,
    FEEDBACK_TOPIC,
    KafkaSettings,
    ensure_topics,
    make_consumer,
    make_producer,
)
from tuneloop.common.logs import configure_logging
from tuneloop.common.settings import SettingsError, load_settings
from tuneloop.feedback import agreement
from tuneloop.feedback.pairs import Pair, PairRules, Rating, pairwise_pairs, ranking_pairs, rating_pairs
from tuneloop.feedback.snapshot import (
    JUDGEMENTS_DIR,
    JUDGEMENTS_SCHEMA,
    ROWS_DIR,
    ROWS_SCHEMA,
    manifest_files,
    open_index,
    watermarks,
    write_parquet,
)
from tuneloop.feedback.validation import DEFAULT_SCALE, default_item_id, judged_completion_ids
from tuneloop.v1 import completion_pb2, dead_letter_pb2, feedback_pb2

log = logging.getLogger(__name__)

# Module level: a metric registers once per process, however many stores a test builds.
ROWS = Counter("tuneloop_store_rows_total", "Training rows written, by label.", ["label"])
DEAD_LETTERS = Counter(
    "tuneloop_store_dead_letters_total",
    "Records sent to the dead-letter topic, by reason "
    "(unparseable, invalid, unknown_completion, tenant_mismatch, different_prompts).",
    ["reason"],
)
DUPLICATES = Counter("tuneloop_store_duplicate_events_total", "Feedback events skipped because their id was stored.")
PENDING = Gauge("tuneloop_store_pending_feedback", "Feedback events waiting for their completion records.")
LAG = Gauge("tuneloop_store_consumer_lag", "Records not yet consumed, per partition.", ["topic", "partition"])
COMMIT_SECONDS = Histogram(
    "tuneloop_store_commit_duration_seconds",
    "One commit: dead letters acknowledged, Parquet written and fsynced, index transaction.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
KAPPA = Gauge("tuneloop_store_agreement_kappa", "Cohen's or Fleiss' kappa over multi-annotated items (NaN: none).")
PERCENT_AGREEMENT = Gauge(
    "tuneloop_store_percent_agreement", "Mean share of annotator pairs agreeing on an item (NaN: none)."
)
ANCHOR_ACCURACY = Gauge(
    "tuneloop_store_anchor_accuracy", "Share of anchor items an annotator judged as the known answer.", ["annotator"]
)


class StoreSettings(BaseSettings):
    """The preference store (env: TUNELOOP_STORE_*)."""

    model_config = SettingsConfigDict(env_prefix="TUNELOOP_STORE_", extra="ignore")

    root: Path = Field(Path(".tuneloop/store"), description="Folder of the store: index, Parquet rows, anchors.json.")
    port: int = Field(50054, ge=0, le=65535, description="gRPC port (health only); 0 picks a free one.")
    metrics_port: int = Field(9094, ge=0, le=65535, description="Prometheus /metrics port; 0 picks a free one.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Log level.")
    group_id: str = Field(
        "tuneloop-store", min_length=1, description="Kafka consumer group the positions are mirrored to."
    )
    feedback_topic: str = Field(FEEDBACK_TOPIC, min_length=1, description="Topic of FeedbackEvent records.")
    completions_topic: str = Field(COMPLETIONS_TOPIC, min_length=1, description="Topic of CompletionRecord records.")
    dlq_topic: str = Field(FEEDBACK_DLQ_TOPIC, min_length=1, description="Topic dead letters go to.")
    create_topics: bool = Field(True, description="Create missing topics at start (off where topics are managed).")
    join_timeout_s: float = Field(
        600.0,
        gt=0,
        le=7 * 86400,
        description="How long feedback waits for its completion record before it is dead-lettered; "
        "longer than the completions stream can lag behind the feedback stream.",
    )
    batch_max_records: int = Field(500, ge=1, le=100_000, description="Most records per commit.")
    batch_linger_s: float = Field(
        1.0, ge=0, le=60, description="How long a batch collects records before it commits (fewer, larger files)."
    )
    ranking_pairs: Literal["all", "adjacent"] = Field(
        "all", description="Ranking → pairs: every ordered pair, or adjacent ranks only (pairs.py)."
    )
    rating_pairs: bool = Field(True, description="Pair scores of the same group that differ by the margin (pairs.py).")
    rating_margin: float = Field(1.0, gt=0, description="Least score gap, in scale units, that makes a rating pair.")
    thumbs_pairs: bool = Field(True, description="Pair a thumbs-up with a thumbs-down of the same group (pairs.py).")
    rating_scope: Literal["request", "prompt"] = Field(
        "prompt", description="Ratings compare within one request's candidates, or across requests of the same prompt."
    )
    rating_same_annotator: bool = Field(True, description="Ratings compare only when given by the same annotator.")
    end_user_weight: float = Field(
        1.0, ge=0, description="Weight of rows from end users' feedback (annotators' rows weigh 1)."
    )
    agreement_interval_s: float = Field(
        60.0, gt=0, description="How often the agreement gauges are recomputed from the judgements."
    )

    def pair_rules(self) -> PairRules:
        return PairRules(
            ranking=self.ranking_pairs,
            rating_pairs=self.rating_pairs,
            rating_margin=self.rating_margin,
            thumbs_pairs=self.thumbs_pairs,
            rating_scope=self.rating_scope,
            rating_same_annotator=self.rating_same_annotator,
        )


class Unusable(Exception):
    """A record that cannot become rows: dead-lettered with `field` and `reason`."""

    def __init__(self, category: str, field: str, reason: str) -> None:
        super().__init__(reason)
        self.category, self.field, self.reason = category, field, reason


@dataclass(frozen=True)
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


@dataclass(frozen=True)
class Completion:
    completion_id: str
    request_id: str
    conversation_id: str
    tenant: str
    prompt: bytes
    rendered_prompt: str
    text: str
    model: str

    @property
    def prompt_key(self) -> str:
        return hashlib.sha256(self.prompt).hexdigest()

    def prompt_parts(self) -> tuple[list[dict[str, str]], str]:
        """(chat messages, raw text): one of the two is empty."""
        prompt = completion_pb2.Prompt.FromString(self.prompt)
        if prompt.WhichOneof("input") == "chat":
            return [{"role": m.role, "content": m.content} for m in prompt.chat.messages], ""
        return [], prompt.raw


def parse_completion(value: bytes | None) -> Completion:
    try:
        rec = completion_pb2.CompletionRecord.FromString(value or b"")
    except DecodeError as err:
        raise Unusable("unparseable", "", f"not a CompletionRecord: {err}") from None
    completion_id = rec.completion_id or rec.completion.completion_id
    if not completion_id:
        raise Unusable("invalid", "completion_id", "required")
    return Completion(
        completion_id=completion_id,
        request_id=rec.request_id,
        conversation_id=rec.conversation_id,
        tenant=rec.tenant,
        # Deterministic bytes: equal prompts compare equal as bytes (and as prompt keys).
        prompt=rec.prompt.SerializeToString(deterministic=True),
        rendered_prompt=rec.rendered_prompt,
        text=rec.completion.text,
        model=f"{rec.model.name}@{rec.model.version}" if rec.model.name else "",
    )


def parse_feedback(value: bytes | None) -> feedback_pb2.FeedbackEvent:
    """Parse and check what the store relies on (the Feedback service checked more)."""
    try:
        event = feedback_pb2.FeedbackEvent.FromString(value or b"")
    except DecodeError as err:
        raise Unusable("unparseable", "", f"not a FeedbackEvent: {err}") from None
    for name in ("event_id", "annotator_id"):
        if not getattr(event, name):
            raise Unusable("invalid", name, "required")
    kind = event.WhichOneof("judgement")
    if kind is None:
        raise Unusable("invalid", "judgement", "required: one of pairwise, rating, ranking")
    ids = judged_completion_ids(event)
    for i, completion_id in enumerate(ids):
        if not completion_id:
            raise Unusable("invalid", _id_field(event, i), "required")
    if len(set(ids)) != len(ids):
        raise Unusable("invalid", _id_field(event, len(ids) - 1), "a completion is named twice")
    if kind == "pairwise" and event.pairwise.choice not in (1, 2, 3, 4):
        raise Unusable("invalid", "pairwise.choice", f"unknown or unspecified choice {event.pairwise.choice}")
    if kind == "ranking" and len(ids) < 2:
        raise Unusable("invalid", "ranking.completion_ids", f"needs at least 2 completions, got {len(ids)}")
    if kind == "rating" and event.rating.WhichOneof("value") is None:
        raise Unusable("invalid", "rating.value", "required: a score or thumbs_up")
    return event


def _id_field(event: feedback_pb2.FeedbackEvent, index: int) -> str:
    kind = event.WhichOneof("judgement")
    if kind == "pairwise":
        return ("pairwise.completion_a_id", "pairwise.completion_b_id")[index]
    if kind == "rating":
        return "rating.completion_id"
    return f"ranking.completion_ids[{index}]"


def check_join(event: feedback_pb2.FeedbackEvent, found: Sequence[Completion]) -> None:
    """What only the join can tell: the completions are the tenant's and judge one prompt."""
    for completion in found:
        if completion.tenant != event.tenant:
            raise Unusable(
                "tenant_mismatch",
                "tenant",
                f"feedback of tenant {event.tenant!r} judges completion {completion.completion_id} "
                f"of tenant {completion.tenant!r}",
            )
    for i, completion in enumerate(found[1:], start=1):
        if completion.prompt != found[0].prompt:
            raise Unusable(
                "different_prompts",
                _id_field(event, i),
                f"completions {found[0].completion_id} and {completion.completion_id} answer different prompts",
            )


_SOURCES = {feedback_pb2.FEEDBACK_SOURCE_END_USER: "end_user", feedback_pb2.FEEDBACK_SOURCE_ANNOTATOR: "annotator"}
_CHOICES = {feedback_pb2.PAIRWISE_CHOICE_TIE: "tie", feedback_pb2.PAIRWISE_CHOICE_BOTH_BAD: "both_bad"}


def _scale(rating: feedback_pb2.RatingJudgement) -> tuple[float, float]:
    if rating.scale_min == 0 and rating.scale_max == 0:
        return DEFAULT_SCALE
    return rating.scale_min, rating.scale_max


def rating_of(event: feedback_pb2.FeedbackEvent, completion: Completion) -> Rating:
    r = event.rating
    thumb = r.WhichOneof("value") == "thumbs_up"
    low, high = _scale(r)
    return Rating(
        event_id=event.event_id,
        completion_id=r.completion_id,
        tenant=event.tenant,
        annotator_id=event.annotator_id,
        request_id=completion.request_id,
        prompt_key=completion.prompt_key,
        kind="thumb" if thumb else "score",
        value=(1.0 if r.thumbs_up else 0.0) if thumb else float(r.score),
        scale_min=low,
        scale_max=high,
    )


def choice_of(event: feedback_pb2.FeedbackEvent) -> tuple[str, float | None]:
    """The verdict in absolute terms (a completion id, not a display position), and a score.

    Pairwise: the preferred completion id, or "tie" / "both_bad". Rating: the score as text
    ("%g") or "up" / "down". Ranking: completion ids best first joined by ">".
    """
    kind = event.WhichOneof("judgement")
    if kind == "pairwise":
        p = event.pairwise
        winner = {feedback_pb2.PAIRWISE_CHOICE_A: p.completion_a_id, feedback_pb2.PAIRWISE_CHOICE_B: p.completion_b_id}
        return winner.get(p.choice) or _CHOICES[p.choice], None
    if kind == "rating":
        if event.rating.WhichOneof("value") == "thumbs_up":
            return ("up" if event.rating.thumbs_up else "down"), None
        return f"{event.rating.score:g}", float(event.rating.score)
    return ">".join(event.ranking.completion_ids), None


@dataclass
class Joined:
    rows: list[dict]
    judgement: dict
    rating: Rating | None


def join(
    event: feedback_pb2.FeedbackEvent,
    record: Record,
    completions: Mapping[str, Completion],
    earlier_ratings: Callable[[Rating], Iterable[Rating]],
    lookup: Callable[[Iterable[str]], Mapping[str, Completion]],
    rules: PairRules,
    weight: float,
) -> Joined:
    """Rows and the judgement of an event whose completions are all in `completions`."""
    ids = judged_completion_ids(event)
    found = [completions[i] for i in ids]
    check_join(event, found)
    kind = event.WhichOneof("judgement")
    rating = None
    if kind == "pairwise":
        pairs = pairwise_pairs(event.pairwise.choice, *ids)
    elif kind == "ranking":
        pairs = ranking_pairs(ids, rules)
    else:
        rating = rating_of(event, found[0])
        pairs = rating_pairs(rating, earlier_ratings(rating), rules)
    known = {**completions, **lookup({i for p in pairs for i in (p.chosen_id, p.rejected_id)} - set(completions))}
    created_at = event.created_at.ToDatetime(tzinfo=UTC)
    item_id = event.item_id or default_item_id(event)
    source = _SOURCES.get(event.source, "unspecified")
    base = {
        "event_id": event.event_id,
        "item_id": item_id,
        "tenant": event.tenant,
        "project": event.project,
        "source": source,
        "annotator_id": event.annotator_id,
        "criteria": list(event.criteria),
        "calibration": event.calibration,
        "anchor": event.anchor,
        "created_at": created_at,
        "topic": record.topic,
        "partition": record.partition,
        "offset": record.offset,
    }
    kind_label = "thumbs" if rating is not None and rating.kind == "thumb" else kind
    rows = [_row(base, pair, known, kind_label, weight, n) for n, pair in enumerate(pairs)]
    choice, score = choice_of(event)
    judgement = {
        **base,
        "kind": kind_label,
        "choice": choice,
        "score": score,
        "completion_ids": sorted(ids),
        "marks": json.dumps(
            [{"criterion": m.criterion, "completion_id": m.completion_id, "value": m.value} for m in event.marks]
        ),
        "comment": event.comment,
    }
    return Joined(rows, judgement, rating)


def _row(base: dict, pair: Pair, known: Mapping[str, Completion], kind: str, weight: float, n: int) -> dict:
    chosen, rejected = known[pair.chosen_id], known[pair.rejected_id]
    messages, raw = chosen.prompt_parts()
    sources = [pair.other_event_id, base["event_id"]] if pair.other_event_id else [base["event_id"]]
    return {
        **base,
        "row_id": f"{base['event_id']}#{n}",
        "source_event_ids": sources,
        "kind": kind,
        "rule": pair.rule,
        "label": pair.label,
        "prompt": messages,
        "prompt_raw": raw,
        "rendered_prompt": chosen.rendered_prompt,
        "chosen": chosen.text,
        "rejected": rejected.text,
        "chosen_id": chosen.completion_id,
        "rejected_id": rejected.completion_id,
        "chosen_model": chosen.model,
        "rejected_model": rejected.model,
        "weight": weight,
    }


@dataclass
class Batch:
    """What one commit writes."""

    positions: dict[tuple[str, int], int] = field(default_factory=dict)
    completions: dict[str, Completion] = field(default_factory=dict)
    completion_sources: dict[str, Record] = field(default_factory=dict)
    rows: list[dict] = field(default_factory=list)
    judgements: list[dict] = field(default_factory=list)
    ratings: list[Rating] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)
    new_pending: list[tuple[Record, float]] = field(default_factory=list)
    resolved_pending: list[tuple[str, int, int]] = field(default_factory=list)
    dead: list[tuple[Record, Unusable]] = field(default_factory=list)
    duplicates: int = 0

    @property
    def changes(self) -> bool:
        return bool(self.positions or self.resolved_pending or self.dead)


class StoreLocked(RuntimeError):
    """Another process writes this store root."""


def _lock(root: Path) -> int:
    fd = os.open(root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StoreLocked(f"another process writes the store at {root}") from None
    return fd


class PreferenceStore:
    """The consumer. `step()` runs one batch; `run(stop)` runs batches until `stop` is set."""

    def __init__(self, settings: StoreSettings, kafka: KafkaSettings) -> None:
        self.settings = settings
        self.rules = settings.pair_rules()
        self.root = settings.root.resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.topics = [settings.feedback_topic, settings.completions_topic]
        self._next_agreement = 0.0
        self._lock_fd = _lock(self.root)
        try:
            self._open(kafka)
        except BaseException:
            os.close(self._lock_fd)
            raise

    # --- setup ---

    def _open(self, kafka: KafkaSettings) -> None:
        self.db = open_index(self.root)
        self._meta_topic()
        self._remove_uncommitted_files()
        if self.settings.create_topics:
            ensure_topics(kafka, [*self.topics, self.settings.dlq_topic])
        self.producer = make_producer(kafka)
        self.consumer = make_consumer(kafka, self.settings.group_id, [])
        self.positions = {
            (t, int(p)): int(o) for t, p, o in self.db.execute("SELECT topic, partition, next_offset FROM positions")
        }
        self._assign()
        PENDING.set(self.pending_count())

    def _meta_topic(self) -> None:
        # Snapshots name the feedback topic; a root belongs to one topic for its lifetime.
        row = self.db.execute("SELECT value FROM meta WHERE key = 'feedback_topic'").fetchone()
        if row is None:
            self.db.execute("INSERT INTO meta VALUES ('feedback_topic', ?)", (self.settings.feedback_topic,))
        elif row[0] != self.settings.feedback_topic:
            raise SettingsError(
                f"store at {self.root} holds topic {row[0]!r}, not {self.settings.feedback_topic!r} "
                "(TUNELOOP_STORE_FEEDBACK_TOPIC); use another root"
            )

    def _remove_uncommitted_files(self) -> None:
        """Delete Parquet files whose commit never landed (crash between rename and COMMIT)."""
        committed = set(manifest_files(self.db, ROWS_DIR)) | set(manifest_files(self.db, JUDGEMENTS_DIR))
        for folder in (ROWS_DIR, JUDGEMENTS_DIR):
            for path in (self.root / folder).glob("*"):
                rel = f"{folder}/{path.name}"
                if rel not in committed:
                    log.warning("removing uncommitted file", extra={"fields": {"file": rel}})
                    path.unlink()

    def _assign(self) -> None:
        """Own every partition; start where the last commit ended, or at the beginning."""
        partitions = [
            TopicPartition(topic, p) for topic in self.topics for p in sorted(self.consumer.partitions_for_topic(topic))
        ]
        self.consumer.assign(partitions)
        for tp in partitions:
            stored = self.positions.get((tp.topic, tp.partition))
            if stored is None:
                # A new root rebuilds from the topic, never from offsets another root committed.
                self.consumer.seek_to_beginning(tp)
            else:
                self.consumer.seek(tp, stored)

    # --- the loop ---

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.step()

    def step(self) -> int:
        """Collect one batch, join it, commit it; return the number of records read."""
        records = self._collect()
        batch = self._process(records, time.time())
        if batch.changes:
            with COMMIT_SECONDS.time():
                self._commit(batch)
        self._update_lag()
        self._update_agreement()
        return len(records)

    def _collect(self) -> list[Record]:
        out: list[Record] = []
        deadline = time.monotonic() + self.settings.batch_linger_s
        while len(out) < self.settings.batch_max_records:
            left = deadline - time.monotonic()
            polled = self.consumer.poll(
                timeout_ms=max(0, int(left * 1000)), max_records=self.settings.batch_max_records - len(out)
            )
            for records in polled.values():
                out.extend(Record(r.topic, r.partition, r.offset, r.key, r.value) for r in records)
            if left <= 0:
                break
        return out

    def _process(self, records: list[Record], now: float) -> Batch:
        batch = Batch()
        feedback = []
        for rec in records:
            batch.positions[(rec.topic, rec.partition)] = rec.offset + 1
            if rec.topic == self.settings.completions_topic:
                try:
                    completion = parse_completion(rec.value)
                except Unusable as err:
                    batch.dead.append((rec, err))
                else:
                    batch.completions[completion.completion_id] = completion
                    batch.completion_sources[completion.completion_id] = rec
            else:
                feedback.append((rec, now, False))
        waiting = [
            (Record(t, p, o, k, v), first_seen, True)
            for t, p, o, k, v, first_seen in self.db.execute(
                'SELECT topic, partition, "offset", key, value, first_seen FROM pending ORDER BY partition, "offset"'
            )
        ]
        for rec, first_seen, was_pending in waiting + feedback:
            self._handle(rec, first_seen, was_pending, now, batch)
        return batch

    def _handle(self, rec: Record, first_seen: float, was_pending: bool, now: float, batch: Batch) -> None:
        resolved = True
        try:
            event = parse_feedback(rec.value)
            if event.event_id in batch.seen or self._seen(event.event_id):
                batch.duplicates += 1
            else:
                resolved = self._join(rec, event, first_seen, now, batch)
        except Unusable as err:
            batch.dead.append((rec, err))
        if resolved and was_pending:
            batch.resolved_pending.append((rec.topic, rec.partition, rec.offset))
        elif not resolved and not was_pending:
            batch.new_pending.append((rec, first_seen))

    def _join(
        self, rec: Record, event: feedback_pb2.FeedbackEvent, first_seen: float, now: float, batch: Batch
    ) -> bool:
        """Join and add to the batch; False when a completion is still missing (keep waiting)."""
        ids = judged_completion_ids(event)
        found = self._lookup(ids, batch)
        missing = [i for i, completion_id in enumerate(ids) if completion_id not in found]
        if missing:
            if now - first_seen < self.settings.join_timeout_s:
                return False
            raise Unusable(
                "unknown_completion",
                _id_field(event, missing[0]),
                f"unknown completion id {ids[missing[0]]} (no completion record within "
                f"{self.settings.join_timeout_s:g} s)",
            )
        weight = self.settings.end_user_weight if event.source == feedback_pb2.FEEDBACK_SOURCE_END_USER else 1.0
        joined = join(
            event,
            rec,
            found,
            earlier_ratings=lambda rating: self._earlier_ratings(rating, batch),
            lookup=lambda more: self._lookup(more, batch),
            rules=self.rules,
            weight=weight,
        )
        batch.rows.extend(joined.rows)
        batch.judgements.append(joined.judgement)
        if joined.rating is not None:
            batch.ratings.append(joined.rating)
        batch.seen.add(event.event_id)
        return True

    def _seen(self, event_id: str) -> bool:
        return self.db.execute("SELECT 1 FROM seen_events WHERE event_id = ?", (event_id,)).fetchone() is not None

    def _lookup(self, ids: Iterable[str], batch: Batch) -> dict[str, Completion]:
        found = {i: batch.completions[i] for i in ids if i in batch.completions}
        rest = [i for i in ids if i not in found]
        if rest:
            marks = ",".join("?" * len(rest))
            for row in self.db.execute(
                "SELECT completion_id, request_id, conversation_id, tenant, prompt, rendered_prompt, text, model "
                f"FROM completions WHERE completion_id IN ({marks})",
                rest,
            ):
                found[row[0]] = Completion(*row)
        return found

    def _earlier_ratings(self, rating: Rating, batch: Batch) -> list[Rating]:
        stored = [
            Rating(*row)
            for row in self.db.execute(
                "SELECT event_id, completion_id, tenant, annotator_id, request_id, prompt_key, kind, value, "
                "scale_min, scale_max FROM ratings WHERE tenant = ? AND kind = ? AND prompt_key = ?",
                (rating.tenant, rating.kind, rating.prompt_key),
            )
        ]
        return stored + batch.ratings

    # --- the commit ---

    def _commit(self, batch: Batch) -> None:
        self._send_dead_letters(batch.dead)
        seq = self.db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM commits").fetchone()[0]
        files = []
        for folder, rows, schema in (
            (ROWS_DIR, batch.rows, ROWS_SCHEMA),
            (JUDGEMENTS_DIR, batch.judgements, JUDGEMENTS_SCHEMA),
        ):
            if rows:
                rel = f"{folder}/{seq:012d}.parquet"
                write_parquet(pa.Table.from_pylist(rows, schema=schema), self.root / rel)
                files.append(rel)
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany(
                "INSERT OR REPLACE INTO completions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        c.completion_id,
                        c.request_id,
                        c.conversation_id,
                        c.tenant,
                        c.prompt,
                        c.prompt_key,
                        c.rendered_prompt,
                        c.text,
                        c.model,
                        src.topic,
                        src.partition,
                        src.offset,
                    )
                    for c, src in ((c, batch.completion_sources[i]) for i, c in batch.completions.items())
                ],
            )
            db.executemany("INSERT INTO seen_events VALUES (?, ?)", [(e, seq) for e in batch.seen])
            db.executemany(
                "INSERT INTO ratings VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        r.event_id,
                        r.completion_id,
                        r.tenant,
                        r.annotator_id,
                        r.request_id,
                        r.prompt_key,
                        r.kind,
                        r.value,
                        r.scale_min,
                        r.scale_max,
                    )
                    for r in batch.ratings
                ],
            )
            db.executemany(
                'DELETE FROM pending WHERE topic = ? AND partition = ? AND "offset" = ?', batch.resolved_pending
            )
            db.executemany(
                "INSERT OR IGNORE INTO pending VALUES (?, ?, ?, ?, ?, ?)",
                [(r.topic, r.partition, r.offset, r.key, r.value, first) for r, first in batch.new_pending],
            )
            db.executemany(
                "INSERT OR REPLACE INTO positions VALUES (?, ?, ?)",
                [(t, p, o) for (t, p), o in batch.positions.items()],
            )
            if files:
                snapshot = watermarks(db, self.settings.feedback_topic)
                db.execute(
                    "INSERT INTO commits VALUES (?, ?, ?, ?)",
                    (seq, time.time(), json.dumps(files), json.dumps(snapshot)),
                )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self.positions.update(batch.positions)
        self._commit_kafka(batch.positions)
        for row in batch.rows:
            ROWS.labels(row["label"]).inc()
        for _, err in batch.dead:
            DEAD_LETTERS.labels(err.category).inc()
        DUPLICATES.inc(batch.duplicates)
        pending = self.pending_count()
        PENDING.set(pending)
        log.info(
            "committed",
            extra={
                "fields": {
                    "seq": seq if files else None,
                    "rows": len(batch.rows),
                    "events": len(batch.judgements),
                    "completions": len(batch.completions),
                    "dead_letters": len(batch.dead),
                    "duplicates": batch.duplicates,
                    "pending": pending,
                }
            },
        )

    def _send_dead_letters(self, dead: list[tuple[Record, Unusable]]) -> None:
        """Send and wait for the broker's acknowledgement: a dead letter is durable before its
        source record counts as handled."""
        if not dead:
            return
        stamp = datetime.now(UTC)
        futures = []
        for rec, err in dead:
            letter = dead_letter_pb2.DeadLetter(
                topic=rec.topic,
                partition=rec.partition,
                offset=rec.offset,
                key=rec.key or b"",
                value=rec.value or b"",
                field=err.field,
                reason=err.reason,
            )
            letter.created_at.FromDatetime(stamp)
            futures.append(self.producer.send(self.settings.dlq_topic, key=rec.key, value=letter.SerializeToString()))
            log.warning(
                "dead letter",
                extra={
                    "fields": {
                        "topic": rec.topic,
                        "partition": rec.partition,
                        "offset": rec.offset,
                        "field": err.field,
                        "reason": err.reason,
                    }
                },
            )
        self.producer.flush()
        for future in futures:
            future.get()

    def _commit_kafka(self, positions: Mapping[tuple[str, int], int]) -> None:
        # Informational (lag in Kafka tooling): the store restarts from its own positions.
        offsets = {TopicPartition(t, p): OffsetAndMetadata(o, "", -1) for (t, p), o in positions.items()}
        try:
            self.consumer.commit(offsets)
        except KafkaError as err:
            log.warning("kafka offset commit failed", extra={"fields": {"error": repr(err)}})

    # --- metrics ---

    def pending_count(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM pending").fetchone()[0])

    def _update_lag(self) -> None:
        for tp in self.consumer.assignment():
            high = self.consumer.highwater(tp)
            if high is not None:
                position = self.positions.get((tp.topic, tp.partition), 0)
                LAG.labels(tp.topic, str(tp.partition)).set(max(0, high - position))

    def _update_agreement(self) -> None:
        """Recompute the agreement gauges once an interval (anchors.json may change too)."""
        now = time.monotonic()
        if now < self._next_agreement:
            return
        self._next_agreement = now + self.settings.agreement_interval_s
        measured = agreement.measure_store(self.root)
        KAPPA.set(measured.kappa)
        PERCENT_AGREEMENT.set(measured.percent_agreement)
        for quality in measured.annotators:
            ANCHOR_ACCURACY.labels(quality.annotator_id).set(quality.anchor_accuracy)

    # --- lifetime ---

    def close(self) -> None:
        self.consumer.close(autocommit=False)
        self.producer.close()
        self.db.close()
        os.close(self._lock_fd)

    def __enter__(self) -> PreferenceStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def main(port: int | None = None, metrics_port: int | None = None) -> None:
    """`tuneloop serve store`: the consumer, gRPC health on `port`, metrics on `metrics_port`."""
    try:
        settings = load_settings(StoreSettings, port=port, metrics_port=metrics_port)
        kafka = load_settings(KafkaSettings)
    except SettingsError as err:
        print(err, file=sys.stderr)
        raise SystemExit(2) from None
    configure_logging("store", settings.log_level)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    # Health only: the store serves no RPCs, the probe says the consumer is up.
    server = GrpcServer("store", lambda _server: [], settings.port, settings.metrics_port)
    try:
        store = PreferenceStore(settings, kafka)
    except (SettingsError, StoreLocked) as err:
        server.stop(grace=0)
        print(err, file=sys.stderr)
        raise SystemExit(2) from None
    with store:
        server.start()
        try:
            store.run(stop)
        finally:
            server.stop(grace=1.0)
    log.info("stopped")
