"""The store's consumer: reads feedback events and completion records from Kafka and appends
them, joined, exactly once, to the Delta tables (tables.py).

Replicas share the work through one Kafka consumer group: each owns some partitions of both
topics and appends concurrently (Delta's optimistic concurrency lets appends of different
partitions commit side by side). A feedback event joins the completions it judges wherever
they were read: from this batch, from a bounded cache fed by the completions table's change
feed (what every replica appended), or from the table itself.

One batch: collect records → parse, dedup by event id, join → send dead letters and wait for
the broker's acknowledgement → append completions, then pairs, then judgements, each one Delta
transaction that also records, per partition it covers, the offset below which that
partition is done → commit the group's Kafka offsets (informational: lag in Kafka tooling).
An append that fails other than by a conflict is written again by halves and the record
whose rows no commit takes is dead-lettered (write_failed; tables.append_by_halves).

Where a partition resumes (a restart, or a new owner after a rebalance): at the table's
version for it. Completions are done when appended. A feedback record is done when stored,
dead-lettered or found a duplicate; one still waiting for its completion holds its
partition's version back, so waiting feedback is never lost across restarts: it is read
again. Records read again that were stored already are skipped (their event id is in the
judgements table; their pair rows, written before the judgement, are known by row id), and
every row carries its record's offset. Dead letters may be sent again for re-read records;
each names its source topic, partition and offset.

Feedback waits for its completion at most `join_timeout_s` from when this process first
read it, then it is dead-lettered; at most `pending_max` events (`pending_max_bytes` of
serialized events) wait, then feedback partitions pause until some resolve, and at most
`pending_max_per_tenant` of one tenant's (`pending_max_bytes_per_tenant`; its oldest beyond
that are dead-lettered, once the completions partitions are read to their end: a backlog's
events whose completions are still to be read wait for them instead). No record stops the consumer: whatever cannot become rows goes to
tuneloop.feedback.dlq.v1 naming the field and the reason.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.compute as pc
from deltalake import DeltaTable
from deltalake.exceptions import CommitFailedError
from kafka import ConsumerRebalanceListener, KafkaConsumer, TopicPartition
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata
from prometheus_client import Counter, Gauge, Histogram

from tuneloop.common.feedback_event import judged_completion_ids
from tuneloop.common.grpc_server import GrpcServer, serving_options
from tuneloop.common.kafka import KafkaSettings, ensure_topics, make_consumer, make_producer
from tuneloop.common.logs import configure_logging
from tuneloop.common.settings import SettingsError, load_or_exit
from tuneloop.store import agreement
from tuneloop.store.join import (
    Completion,
    Record,
    Unusable,
    id_field,
    join,
    parse_completion,
    parse_feedback,
    rating_from_judgement,
)
from tuneloop.store.pairs import Rating
from tuneloop.store.settings import StoreSettings
from tuneloop.store.tables import (
    COMPLETIONS,
    COMPLETIONS_SCHEMA,
    JUDGEMENTS,
    JUDGEMENTS_SCHEMA,
    PAIRS,
    PAIRS_SCHEMA,
    Source,
    WriteFailed,
    append,
    append_by_halves,
    ensure_tables,
    landed,
    partition_version,
    scan,
    source_of,
)
from tuneloop.v1 import dead_letter_pb2, feedback_pb2

log = logging.getLogger(__name__)

# Module level: a metric registers once per process, however many stores a test builds.
ROWS = Counter("tuneloop_store_rows_total", "Training rows written, by label.", ["label"])
DEAD_LETTERS = Counter(
    "tuneloop_store_dead_letters_total",
    "Records sent to the dead-letter topic, by reason "
    "(unparseable, invalid, unknown_completion, tenant_mismatch, different_prompts, unprocessable, pending_limit, "
    "write_failed).",
    ["reason"],
)
DUPLICATES = Counter(
    "tuneloop_store_duplicate_events_total", "Feedback events skipped because their id was stored (or re-read)."
)
PENDING = Gauge("tuneloop_store_pending_feedback", "Feedback events waiting for their completion records.")
PENDING_BYTES = Gauge(
    "tuneloop_store_pending_feedback_bytes", "Serialized size of the feedback events waiting for their completions."
)
LAG = Gauge("tuneloop_store_consumer_lag", "Records not yet consumed, per partition owned.", ["topic", "partition"])
WRITE_FAILURES = Counter(
    "tuneloop_store_write_failures_total",
    "Appends that failed for a reason other than a commit conflict (their batch is then written by halves).",
    ["table"],
)
CONFLICTS = Counter(
    "tuneloop_store_commit_conflicts_total", "Commits refused because another writer committed the same partition."
)
COMMIT_SECONDS = Histogram(
    "tuneloop_store_commit_duration_seconds",
    "One batch's commit: dead letters acknowledged, then the Delta appends.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
KAPPA = Gauge(
    "tuneloop_store_agreement_kappa", "Cohen's or Fleiss' kappa over a tenant's multi-annotated items (NaN: none).",
    ["tenant"],
)
PERCENT_AGREEMENT = Gauge(
    "tuneloop_store_percent_agreement", "Mean share of annotator pairs agreeing on a tenant's item (NaN: none).",
    ["tenant"],
)
ANCHOR_ACCURACY = Gauge(
    "tuneloop_store_anchor_accuracy", "Share of anchor items an annotator judged as the known answer.",
    ["tenant", "annotator"],
)

_RATING_KINDS = ("rating", "thumbs")
_LEAVE_GROUP_TIMEOUT_MS = 5000
_JUDGEMENT_INDEX_COLUMNS = [
    "event_id",
    "tenant",
    "annotator_id",
    "kind",
    "completion_ids",
    "request_id",
    "prompt_key",
    "value",
    "scale_min",
    "scale_max",
]


@dataclass
class Waiting:
    """A feedback record whose completions have not all been read yet."""

    record: Record
    first_seen: float
    looked_in_table: bool = False
    tenant: str = ""

    @property
    def size(self) -> int:
        """What it costs the waiting room: the serialized event's bytes."""
        return len(self.record.value or b"")


@dataclass
class Batch:
    """What one commit writes."""

    positions: dict[tuple[str, int], int] = field(default_factory=dict)
    completions: dict[str, tuple[Completion, Record]] = field(default_factory=dict)
    rows: list[dict] = field(default_factory=list)
    judgements: list[dict] = field(default_factory=list)
    ratings: list[Rating] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)
    dead: list[tuple[Record, Unusable]] = field(default_factory=list)
    duplicates: int = 0
    resolved: int = 0  # waiting records that were stored, skipped or dead-lettered
    sources: dict[Source, Record] = field(default_factory=dict)  # the records the rows come from

    @property
    def changes(self) -> bool:
        return bool(self.positions or self.dead or self.resolved)

    def forget(self, source: Source, rows_written: bool) -> None:
        """Undo what a record that a table refused added to the batch: it must not count as
        stored (its event id stays free, its rating pairs with no later rating)."""
        gone = {j["event_id"] for j in self.judgements if source_of(j) == source}
        self.judgements = [j for j in self.judgements if source_of(j) != source]
        if not rows_written:
            self.rows = [row for row in self.rows if source_of(row) != source]
        self.seen -= gone
        self.ratings = [r for r in self.ratings if r.event_id not in gone]
        self.completions = {
            key: (completion, rec) for key, (completion, rec) in self.completions.items()
            if (rec.topic, rec.partition, rec.offset) != source
        }


def _unprocessable(rec: Record, err: Exception) -> Unusable:
    """A record that broke the join in a way no check foresaw: its dead letter, and the trace in
    the log, so that one record costs itself and never the partition behind it."""
    log.exception("unprocessable record", extra={"fields": {"topic": rec.topic, "partition": rec.partition,
                                                            "offset": rec.offset}})
    return Unusable("unprocessable", "", f"cannot process: {type(err).__name__}: {err}"[:1000])


def _unstick_parked_records(consumer: KafkaConsumer) -> None:
    """Let records fetched before a pause() be read after resume().

    kafka-python 3.0 parks a paused partition's already-fetched records and stops fetching
    it until they are handed back, but hands them back only while its in-line slot is None,
    and it leaves an exhausted batch there instead: the resumed partition is then never read
    again. An exhausted batch holds nothing, so emptying the slot loses nothing.
    """
    fetcher = getattr(consumer, "_fetcher", None)
    current = getattr(fetcher, "_next_partition_records", None)
    if current is not None and not current and getattr(fetcher, "_paused_partition_records", None):
        fetcher._next_partition_records = None


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, store: PreferenceStore) -> None:
        self.store = store

    def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        self.store._release(revoked)

    def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        self.store._resume(assigned)


class PreferenceStore:
    """The consumer. `step()` runs one batch; `run(stop)` runs batches until `stop` is set."""

    def __init__(self, settings: StoreSettings, kafka: KafkaSettings) -> None:
        self.settings = settings
        self.rules = settings.pair_rules()
        self.root = settings.root
        self.feedback_topic, self.completions_topic = settings.feedback_topic, settings.completions_topic
        self.tables: dict[str, DeltaTable] = ensure_tables(self.root)
        # What this process knows of the tables, kept fresh from their change data feeds.
        self._feed_version = {name: self.tables[name].version() for name in (COMPLETIONS, JUDGEMENTS)}
        self._completions: OrderedDict[str, Completion] = OrderedDict()
        self._event_ids: set[str] = set()
        self._ratings: dict[tuple[str, str, str], dict[str, Rating]] = {}
        self._index_judgements(self._scan(JUDGEMENTS, _JUDGEMENT_INDEX_COLUMNS).to_pylist())
        # Per owned partition: where reading goes on (None: the topic's beginning), and what waits there.
        self.positions: dict[tuple[str, int], int | None] = {}
        self.pending: dict[tuple[str, int], OrderedDict[int, Waiting]] = {}
        self._replayed_rows: set[str] = set()
        # Per table and partition: the version its last commit recorded.
        self._versions: dict[str, dict[tuple[str, int], int | None]] = {name: {} for name in self.tables}
        self._next_agreement = 0.0
        if settings.create_topics:
            ensure_topics(kafka, [self.feedback_topic, self.completions_topic, settings.dlq_topic])
        self.producer = make_producer(kafka)
        self.consumer = make_consumer(kafka, settings.group_id)
        self.consumer.subscribe([self.feedback_topic, self.completions_topic], listener=_Rebalance(self))
        self._await_partition_metadata([self.feedback_topic, self.completions_topic])

    def _await_partition_metadata(self, topics: list[str], timeout_s: float = 30.0) -> None:
        """Fetch the subscribed topics' metadata before the first poll joins the group.

        kafka-python takes the partitions it assigns from metadata fetched after subscribe();
        without it the first assignment is empty (or looks stale once metadata arrives) and a
        second rebalance follows at once. Topics that do not exist yet are left to the
        periodic refresh (metadata_max_age_ms).
        """
        deadline = time.monotonic() + timeout_s
        missing = list(topics)
        while missing and time.monotonic() < deadline:
            known = self.consumer.topics()  # always asks the broker: the group sees the answer
            missing = [t for t in missing if t not in known or not self.consumer.partitions_for_topic(t)]
            if missing:
                time.sleep(0.2)
        if missing:
            log.warning("topics without partitions yet", extra={"fields": {"topics": missing}})

    # --- ownership ---

    def _release(self, revoked: Iterable[TopicPartition]) -> None:
        """Forget what was read of partitions another replica now owns (it resumes them from the tables)."""
        for tp in revoked:
            self.positions.pop((tp.topic, tp.partition), None)
            self.pending.pop((tp.topic, tp.partition), None)
            for known in self._versions.values():
                known.pop((tp.topic, tp.partition), None)
        PENDING.set(self.pending_count())
        PENDING_BYTES.set(self.pending_bytes())

    def _resume(self, assigned: Iterable[TopicPartition]) -> None:
        """Start each new partition where the tables say it is done."""
        for table in self.tables.values():
            table.update_incremental()
        replay: list[tuple[str, int, int]] = []
        for tp in assigned:
            key = (tp.topic, tp.partition)
            names = (COMPLETIONS,) if tp.topic == self.completions_topic else (PAIRS, JUDGEMENTS)
            versions = [partition_version(self.tables[name], *key) for name in names]
            for name, version in zip(names, versions, strict=True):
                self._versions[name][key] = version
            known = [v for v in versions if v is not None]
            start = min(known) if len(known) == len(versions) else None
            if start is None:
                self.consumer.seek_to_beginning(tp)
            else:
                self.consumer.seek(tp, start)
            self.positions[key] = start
            self.pending[key] = OrderedDict()
            if tp.topic == self.feedback_topic:
                replay.append((tp.topic, tp.partition, start or 0))
        if replay:
            self._replayed_rows |= self._rows_past(replay)
        log.info("partitions assigned", extra={"fields": {"partitions": sorted(self.positions)}})

    def _rows_past(self, starts: list[tuple[str, int, int]]) -> set[str]:
        """Pair rows already written from records at or past where their partitions resume."""
        where = None
        for topic, partition, start in starts:
            part = (pc.field("topic") == topic) & (pc.field("partition") == partition) & (pc.field("offset") >= start)
            where = part if where is None else where | part
        found = scan(self.tables[PAIRS], ["row_id"], where)
        return set(found.column("row_id").to_pylist())

    # --- what the tables hold ---

    def _scan(self, name: str, columns: list[str], where: pc.Expression | None = None) -> pa.Table:
        return scan(self.tables[name], columns, where)

    def _index_judgements(self, judgements: list[dict]) -> None:
        for row in judgements:
            self._event_ids.add(row["event_id"])
            if row["kind"] in _RATING_KINDS and row["prompt_key"] is not None:
                self._remember_rating(rating_from_judgement(row))

    def _remember_rating(self, rating: Rating) -> None:
        self._ratings.setdefault((rating.tenant, rating.kind, rating.prompt_key), {})[rating.event_id] = rating

    def _remember_completion(self, completion: Completion) -> None:
        self._completions[completion.completion_id] = completion
        self._completions.move_to_end(completion.completion_id)
        while len(self._completions) > self.settings.completion_cache_max:
            self._completions.popitem(last=False)

    def _follow(self) -> None:
        """Read what every writer appended to completions and judgements since we last looked."""
        for name in (COMPLETIONS, JUDGEMENTS):
            table = self.tables[name]
            table.update_incremental()
            if table.version() <= self._feed_version[name]:
                continue
            changes = pa.table(table.load_cdf(starting_version=self._feed_version[name] + 1))
            inserted = [r for r in changes.to_pylist() if r["_change_type"] == "insert"]
            if name == COMPLETIONS:
                for row in inserted:
                    self._remember_completion(Completion.from_row(row))
            else:
                self._index_judgements(inserted)
            self._feed_version[name] = table.version()

    # --- the loop ---

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.step()

    def step(self) -> int:
        """Collect one batch, join it, commit it; return the number of records read."""
        self._pause_when_full()
        records = self._collect()
        self._follow()
        batch = self._process(records, time.time())
        if batch.changes:
            with COMMIT_SECONDS.time():
                self._commit(batch)
        self._update_lag()
        self._update_agreement()
        return len(records)

    def _pause_when_full(self) -> None:
        feedback = [tp for tp in self.consumer.assignment() if tp.topic == self.feedback_topic]
        if self._waiting_room_full():
            self.consumer.pause(*feedback)
            return
        paused = [tp for tp in self.consumer.paused() if tp in feedback]
        if paused:
            self.consumer.resume(*paused)
            # Fetches answered while paused were dropped: read on from where we stand.
            for tp in paused:
                position = self.positions.get((tp.topic, tp.partition))
                if position is not None:
                    self.consumer.seek(tp, position)

    def _waiting_room_full(self) -> bool:
        return (
            self.pending_count() >= self.settings.pending_max
            or self.pending_bytes() >= self.settings.pending_max_bytes
        )

    def _collect(self) -> list[Record]:
        out: list[Record] = []
        deadline = time.monotonic() + self.settings.batch_linger_s
        while len(out) < self.settings.batch_max_records:
            left = deadline - time.monotonic()
            _unstick_parked_records(self.consumer)
            polled = self.consumer.poll(
                timeout_ms=max(0, int(left * 1000)), max_records=self.settings.batch_max_records - len(out)
            )
            for records in polled.values():
                out.extend(Record(r.topic, r.partition, r.offset, r.key, r.value) for r in records)
            if left <= 0:
                break
        # A rebalance inside poll may have taken partitions away (or given them back from
        # the start): keep only records that continue where each owned partition stands.
        kept, expected = [], dict(self.positions)
        for rec in out:
            key = (rec.topic, rec.partition)
            if key in expected and expected[key] in (None, rec.offset):
                kept.append(rec)
                expected[key] = rec.offset + 1
        return kept

    def _process(self, records: list[Record], now: float) -> Batch:
        batch = Batch()
        feedback: dict[tuple[str, int], list[Record]] = {}
        for rec in records:
            batch.positions[(rec.topic, rec.partition)] = rec.offset + 1
            if rec.topic == self.completions_topic:
                try:
                    completion = parse_completion(rec.value)
                except Unusable as err:
                    batch.dead.append((rec, err))
                except Exception as err:  # no record may stop the store
                    batch.dead.append((rec, _unprocessable(rec, err)))
                else:
                    batch.completions[completion.completion_id] = (completion, rec)
                    batch.sources[rec.topic, rec.partition, rec.offset] = rec
            else:
                feedback.setdefault((rec.topic, rec.partition), []).append(rec)
        self._prefetch([rec for records in feedback.values() for rec in records], batch)
        for key, waiting in list(self.pending.items()):
            for offset, item in list(waiting.items()):
                if self._handle(item, now, batch):
                    del waiting[offset]
                    batch.resolved += 1
            for rec in feedback.pop(key, []):
                item = Waiting(rec, now, looked_in_table=True)
                if not self._handle(item, now, batch):
                    waiting[rec.offset] = item
        self._shed_tenant_overflow(batch)
        return batch

    def _shed_tenant_overflow(self, batch: Batch) -> None:
        """Dead-letter each tenant's oldest waiting events beyond its share of the waiting room,
        in events and in bytes."""
        if self._tenant_overflow("", self.pending_count(), self.pending_bytes()) is None:
            return  # all together are within one tenant's share: skip the walk over every waiting event
        if not self._completions_read_to_end():
            # Their completions may be in the log still to read (a store catching up on a
            # backlog): those events would join. The global bound pauses feedback meanwhile.
            return
        by_tenant: dict[str, list[tuple[tuple[str, int], int, Waiting]]] = {}
        for key, waiting in self.pending.items():
            for offset, item in waiting.items():
                by_tenant.setdefault(item.tenant, []).append((key, offset, item))
        for tenant, items in by_tenant.items():
            count, size = len(items), sum(entry[2].size for entry in items)
            items.sort(key=lambda entry: (entry[2].first_seen, entry[0], entry[1]))
            for key, offset, item in items:
                reason = self._tenant_overflow(tenant, count, size)
                if reason is None:
                    break
                count, size = count - 1, size - item.size
                del self.pending[key][offset]
                batch.resolved += 1
                batch.dead.append((item.record, Unusable("pending_limit", "tenant", reason)))

    def _completions_read_to_end(self) -> bool:
        """Whether every completions partition is read up to the broker's end offset, by this
        replica (its position) or by another (the completions table's version for it, as
        loaded for this step's joins): then the waiting events wait for completions not yet
        written, not for ones still to be read."""
        topic = self.completions_topic
        partitions = [TopicPartition(topic, p) for p in sorted(self.consumer.partitions_for_topic(topic) or ())]
        if not partitions:
            return True
        read = {tp: max((x for x in (self.positions.get((topic, tp.partition)),
                                     partition_version(self.tables[COMPLETIONS], topic, tp.partition))
                         if x is not None), default=None) for tp in partitions}
        try:
            ends = self.consumer.end_offsets(partitions)
            # Read by no one yet: at its first offset (0 unless retention removed some).
            unread = [tp for tp, done in read.items() if done is None]
            read |= self.consumer.beginning_offsets(unread) if unread else {}
        except KafkaError as err:
            log.warning("completions end offsets unknown (%s): no waiting event is shed now", err)
            return False
        return all(read[tp] >= ends[tp] for tp in partitions)

    def _tenant_overflow(self, tenant: str, count: int, size: int) -> str | None:
        """Why a tenant with `count` events of `size` bytes waiting is over its share; None if it is not."""
        if count > self.settings.pending_max_per_tenant:
            return (f"tenant {tenant} has more than {self.settings.pending_max_per_tenant} events "
                    "waiting for their completions")
        if size > self.settings.pending_max_bytes_per_tenant:
            return (f"tenant {tenant} has more than {self.settings.pending_max_bytes_per_tenant} bytes "
                    "of events waiting for their completions")
        return None

    def _handle(self, item: Waiting, now: float, batch: Batch) -> bool:
        """Store, skip or dead-letter the record; False while it must keep waiting."""
        rec = item.record
        try:
            event = parse_feedback(rec.value)
            item.tenant = event.tenant
            if event.event_id in batch.seen or event.event_id in self._event_ids:
                batch.duplicates += 1
                return True
            return self._join(item, event, now, batch)
        except Unusable as err:
            batch.dead.append((rec, err))
            return True
        except Exception as err:  # no record may stop the store
            batch.dead.append((rec, _unprocessable(rec, err)))
            return True

    def _join(self, item: Waiting, event: feedback_pb2.FeedbackEvent, now: float, batch: Batch) -> bool:
        ids = judged_completion_ids(event)
        found = self._lookup(ids, batch, look_in_table=not item.looked_in_table)
        item.looked_in_table = True
        missing = [i for i, completion_id in enumerate(ids) if completion_id not in found]
        if missing:
            if now - item.first_seen < self.settings.join_timeout_s:
                return False
            raise Unusable(
                "unknown_completion",
                id_field(event, missing[0]),
                f"unknown completion id {ids[missing[0]]} (no completion record within "
                f"{self.settings.join_timeout_s:g} s)",
            )
        weight = self.settings.end_user_weight if event.source == feedback_pb2.FEEDBACK_SOURCE_END_USER else 1.0
        joined = join(
            event,
            item.record,
            found,
            earlier_ratings=lambda rating: self._earlier_ratings(rating, batch),
            lookup=lambda more: self._lookup(more, batch, look_in_table=True),
            rules=self.rules,
            weight=weight,
        )
        batch.rows.extend(row for row in joined.rows if row["row_id"] not in self._replayed_rows)
        batch.judgements.append(joined.judgement)
        batch.sources[item.record.topic, item.record.partition, item.record.offset] = item.record
        if joined.rating is not None:
            batch.ratings.append(joined.rating)
        batch.seen.add(event.event_id)
        return True

    def _prefetch(self, records: list[Record], batch: Batch) -> None:
        """One read of the completions table for every completion the new feedback names
        that neither this batch nor the cache holds (written by another replica, or before
        this process started)."""
        wanted: set[str] = set()
        for rec in records:
            try:
                wanted.update(judged_completion_ids(parse_feedback(rec.value)))
            except Exception:
                continue  # dead-lettered when handled
        self._lookup(wanted, batch, look_in_table=True)

    def _lookup(self, ids: Iterable[str], batch: Batch, look_in_table: bool) -> dict[str, Completion]:
        found: dict[str, Completion] = {}
        for i in ids:
            if i in batch.completions:
                found[i] = batch.completions[i][0]
            elif i in self._completions:
                found[i] = self._completions[i]
        rest = [i for i in ids if i not in found]
        if rest and look_in_table:
            # Older than the cache (or than this process): one read of the table.
            for row in self._scan(COMPLETIONS, list(COMPLETIONS_SCHEMA.names), pc.field("completion_id").isin(rest)).to_pylist():
                completion = Completion.from_row(row)
                found[completion.completion_id] = completion
                self._remember_completion(completion)
        return found

    def _earlier_ratings(self, rating: Rating, batch: Batch) -> list[Rating]:
        stored = list(self._ratings.get((rating.tenant, rating.kind, rating.prompt_key), {}).values())
        return stored + batch.ratings

    # --- the commit ---

    def _done_offsets(self, batch: Batch) -> dict[tuple[str, int], int]:
        """Per partition the batch covers: the offset below which everything is done."""
        out = {}
        for key, waiting in self.pending.items():
            position = batch.positions.get(key, self.positions.get(key))
            if position is None:
                continue  # nothing read there yet
            out[key] = min(position, next(iter(waiting))) if waiting else position
        return out

    def _commit(self, batch: Batch) -> None:
        self._send_dead_letters(batch.dead)
        done = self._done_offsets(batch)
        completions = {k: v for k, v in done.items() if k[0] == self.completions_topic}
        feedback = {k: v for k, v in done.items() if k[0] == self.feedback_topic}
        try:
            if completions:
                rows = [c.to_row(rec) for c, rec in batch.completions.values()]
                self._write(COMPLETIONS, rows, COMPLETIONS_SCHEMA, completions, batch)
            if feedback:
                # Pairs before judgements: a judgement stored means its pairs are too.
                self._write(PAIRS, batch.rows, PAIRS_SCHEMA, feedback, batch)
                self._write(JUDGEMENTS, batch.judgements, JUDGEMENTS_SCHEMA, feedback, batch)
        except CommitFailedError as err:
            # Another replica committed one of these partitions: it owns them now. Start
            # over from the tables for every partition we still hold.
            CONFLICTS.inc()
            log.warning("commit conflict; resuming from the tables", extra={"fields": {"error": str(err)}})
            owned = [TopicPartition(t, p) for t, p in self.positions]
            self._release(owned)
            self._resume(owned)
            return
        for completion, _ in batch.completions.values():
            self._remember_completion(completion)
        self._event_ids |= batch.seen
        for rating in batch.ratings:
            self._remember_rating(rating)
        for key, position in batch.positions.items():
            if key in self.positions:
                self.positions[key] = position
        self._commit_kafka(done)
        for row in batch.rows:
            ROWS.labels(row["label"]).inc()
        for _, err in batch.dead:
            DEAD_LETTERS.labels(err.category).inc()
        DUPLICATES.inc(batch.duplicates)
        pending = self.pending_count()
        PENDING.set(pending)
        PENDING_BYTES.set(self.pending_bytes())
        log.info(
            "committed",
            extra={
                "fields": {
                    "rows": len(batch.rows),
                    "events": len(batch.judgements),
                    "completions": len(batch.completions),
                    "dead_letters": len(batch.dead),
                    "duplicates": batch.duplicates,
                    "pending": pending,
                    "pairs_version": self.tables[PAIRS].version(),
                }
            },
        )

    def _write(
        self, name: str, rows: list[dict], schema: pa.Schema, versions: Mapping[tuple[str, int], int], batch: Batch
    ) -> None:
        """Append the batch's rows to one table; if that fails, by halves, dead-lettering the
        records whose rows cannot be written (tables.append_by_halves)."""
        try:
            self._append(name, rows, schema, versions)
            return
        except WriteFailed as err:
            log.warning("write failed; writing the batch by halves",
                        extra={"fields": {"table": name, "rows": len(rows), "error": repr(err.__cause__)}})

        def write(part: list[dict], part_versions: Mapping[tuple[str, int], int], force: bool) -> None:
            self._append(name, part, schema, part_versions, force=force)

        def give_up(source: Source, err: WriteFailed) -> None:
            self._give_up(name, batch, source, err)

        append_by_halves(write, rows, versions, give_up)

    def _give_up(self, name: str, batch: Batch, source: Source, err: WriteFailed) -> None:
        """Dead-letter a record the table would not take, before any version passes it."""
        cause = err.__cause__ or err
        reason = f"write_failed: {type(cause).__name__}: the {name} table refused its rows: {cause}"
        letter = (batch.sources[source], Unusable("write_failed", "", reason[:1000]))
        self._send_dead_letters([letter])
        batch.dead.append(letter)
        # Pairs are written before judgements: a record the judgements refused keeps its pairs.
        batch.forget(source, rows_written=name == JUDGEMENTS)

    def _append(
        self,
        name: str,
        rows: list[dict],
        schema: pa.Schema,
        versions: Mapping[tuple[str, int], int],
        force: bool = False,
    ) -> None:
        """One commit of `rows` and `versions`. Raises CommitFailedError on a conflict and
        WriteFailed when the commit failed for another reason and was not written."""
        known = self._versions[name]
        if not force and not rows and all(known.get(key) == version for key, version in versions.items()):
            return  # nothing new to record
        table = self.tables[name]
        since, commit_id = table.version(), uuid.uuid4().hex
        try:
            append(table, pa.Table.from_pylist(rows, schema=schema), versions, commit_id)
        except CommitFailedError:
            raise
        except Exception as err:
            WRITE_FAILURES.labels(name).inc()
            if not landed(table, commit_id, since):
                raise WriteFailed(f"append to {name} failed: {type(err).__name__}") from err
            log.warning("append raised after its commit was written",
                        extra={"fields": {"table": name, "error": repr(err)}})
        known.update(versions)
        table.update_incremental()

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

    def _commit_kafka(self, done: Mapping[tuple[str, int], int]) -> None:
        # Informational (lag in Kafka tooling): partitions resume from the tables' versions.
        offsets = {TopicPartition(t, p): OffsetAndMetadata(o, "", -1) for (t, p), o in done.items()}
        try:
            self.consumer.commit(offsets)
        except KafkaError as err:
            log.warning("kafka offset commit failed", extra={"fields": {"error": repr(err)}})

    # --- metrics ---

    def pending_count(self) -> int:
        return sum(len(w) for w in self.pending.values())

    def pending_bytes(self) -> int:
        return sum(item.size for waiting in self.pending.values() for item in waiting.values())

    def _update_lag(self) -> None:
        for tp in self.consumer.assignment():
            high = self.consumer.highwater(tp)
            if high is not None:
                position = self.positions.get((tp.topic, tp.partition)) or 0
                LAG.labels(tp.topic, str(tp.partition)).set(max(0, high - position))

    def _update_agreement(self) -> None:
        """Recompute the agreement gauges once an interval (anchors.json may change too)."""
        now = time.monotonic()
        if now < self._next_agreement:
            return
        self._next_agreement = now + self.settings.agreement_interval_s
        for tenant, measured in agreement.measure_tenants(self.root).items():
            KAPPA.labels(tenant).set(measured.kappa)
            PERCENT_AGREEMENT.labels(tenant).set(measured.percent_agreement)
            for quality in measured.annotators:
                ANCHOR_ACCURACY.labels(tenant, quality.annotator_id).set(quality.anchor_accuracy)

    # --- lifetime ---

    def close(self) -> None:
        # Leaving the group is a courtesy that speeds the next rebalance, and it may wait: the
        # coordinator answers a connection's requests in order, so a LeaveGroup queues behind
        # this member's own JoinGroup, which it holds until every member has rejoined or timed
        # out (45 s for a killed one). Give up after a few seconds; the session expires anyway.
        self.consumer.close(autocommit=False, timeout_ms=_LEAVE_GROUP_TIMEOUT_MS)
        self.producer.close()

    def __enter__(self) -> PreferenceStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def main(port: int | None = None, metrics_port: int | None = None) -> None:
    """`tuneloop serve store`: the consumer, gRPC health on `port`, metrics on `metrics_port`."""
    settings = load_or_exit(StoreSettings, port=port, metrics_port=metrics_port)
    kafka = load_or_exit(KafkaSettings)
    configure_logging("store", settings.log_level)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    # Health only: the store serves no RPCs, the probe says the consumer is up.
    server = GrpcServer("store", lambda _server: [], **serving_options(settings))
    try:
        store = PreferenceStore(settings, kafka)
    except SettingsError as err:
        server.stop(grace=0)
        print(err, file=sys.stderr)
        raise SystemExit(2) from None
    with store:
        server.start()
        try:
            store.run(stop)
        finally:
            server.stop()
    log.info("stopped")
