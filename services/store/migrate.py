"""Migration of a store of the old format into the Delta tables (tables.py).

The old format (before Delta) was one folder:

    index.sqlite                  completions, ratings, consumed positions, pending feedback,
                                  and the manifest (`commits`: which Parquet files are committed)
    rows/<seq>.parquet            training rows, the columns of today's pairs table
    judgements/<seq>.parquet      judgements, today's columns less the five a rating is kept by

`migrate` copies it into the three tables, each in ONE Delta commit that carries the app
transactions the consumer resumes from (tables.py): the completions table gets the old
completions-topic positions; pairs and judgements get the old feedback-topic watermarks, i.e.
the position held back by the oldest feedback still pending there. A store started on the
migrated tables therefore goes on exactly where the old one stopped, and reads the pending
feedback again from Kafka (rows past a watermark that were stored already are recognised as
such by the consumer and not written twice).

Nothing of the old store is changed. The target may be the old folder itself: then its
`judgements/` folder holds both the old Parquet files and the new table, which is why
`vacuum` and `erase` (admin.py) refuse to run while old files are left there.

Stop the old store before migrating (its lock is checked), and start the new one only after.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import sqlite3
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from deltalake import CommitProperties, DeltaTable, Transaction, write_deltalake

from tuneloop.common.kafka import COMPLETIONS_TOPIC, FEEDBACK_TOPIC
from tuneloop.store.read import ANCHORS_FILE
from tuneloop.store.tables import (
    ADDED_COLUMNS,
    COMPLETIONS,
    COMPLETIONS_SCHEMA,
    JUDGEMENTS,
    JUDGEMENTS_SCHEMA,
    PAIRS,
    PAIRS_SCHEMA,
    app_id,
    dataset,
    ensure_tables,
    is_url,
    open_table,
    parse_app_id,
    table_uri,
)

LEGACY_INDEX, LEGACY_ROWS, LEGACY_JUDGEMENTS = "index.sqlite", "rows", "judgements"
LEGACY_LOCK = ".lock"
# Commit metadata naming the source, so that a migration cut short can be run again.
MIGRATED_FROM = "tuneloop.migrated_from"

# What a rating judgement is remembered by (join.py); the old judgement files lack them.
_RATING_COLUMNS = ("request_id", "prompt_key", "value", "scale_min", "scale_max")
_RATING_KINDS = ("rating", "thumbs")
_OLD_JUDGEMENTS_SCHEMA = pa.schema([f for f in JUDGEMENTS_SCHEMA if f.name not in _RATING_COLUMNS])
_KEYS = {COMPLETIONS: "completion_id", JUDGEMENTS: "event_id", PAIRS: "row_id"}
# The old index's columns: those added since (tables.ADDED_COLUMNS) stay null.
_COMPLETION_COLUMNS = [f.name for f in COMPLETIONS_SCHEMA if f.name not in ADDED_COLUMNS[COMPLETIONS]]
_CHUNK = 5_000
_MAX_PROBLEMS = 10


class MigrationError(RuntimeError):
    """The migration cannot start, or what was written differs from the old store."""


@dataclass
class TableReport:
    name: str
    rows: int = 0
    version: int = -1
    # app id -> version, as committed (tables.py's exactly-once marks)
    app_versions: dict[str, int] = field(default_factory=dict)
    # True: an earlier run of this migration had committed it; this run only verified it
    already_migrated: bool = False


@dataclass
class MigrationReport:
    source: str
    root: str
    same_folder: bool
    feedback_topic: str
    completions_topic: str
    tables: dict[str, TableReport]
    pending: dict[int, int]  # feedback partition -> pending events, read again from Kafka
    ratings_unmatched: int  # rating judgements with no row in the old `ratings` table
    completions_unmatched: int  # other judgements whose first completion is not in the index
    anchors_copied: bool
    legacy_files: list[str]  # what is left of the old store (nothing is deleted)

    def summary(self) -> str:
        lines = [f"migrated {self.source} -> {self.root}"]
        for t in self.tables.values():
            note = " (already migrated: verified only)" if t.already_migrated else ""
            lines.append(f"  {t.name}: {t.rows} rows, version {t.version}, resumes at {_resume_text(t)}{note}")
        if self.pending:
            waiting = ", ".join(f"{p}: {n}" for p, n in sorted(self.pending.items()))
            lines.append(f"  pending feedback, read again from {self.feedback_topic}: {waiting}")
        if self.ratings_unmatched:
            lines.append(f"  {self.ratings_unmatched} rating judgements had no rating row: stored without value")
        if self.completions_unmatched:
            lines.append(f"  {self.completions_unmatched} judgements name an unknown first completion")
        if self.anchors_copied:
            lines.append(f"  {ANCHORS_FILE} copied")
        if self.legacy_files:
            lines.append(f"  old store left in place: {len(self.legacy_files)} files under {self.source}")
            if self.same_folder:
                lines.append(
                    f"  its {LEGACY_JUDGEMENTS}/*.parquet share the new judgements table's folder: "
                    "vacuum and erase refuse to run until the old files are removed"
                )
        lines.append("  verified: every old row, judgement and completion present once with equal values")
        return "\n".join(lines)


def _resume_text(table: TableReport) -> str:
    """The app versions as the old snapshot ids spelled offsets: `topic@0:4,1:2`."""
    by_topic: dict[str, list[tuple[int, int]]] = {}
    for app, version in table.app_versions.items():
        topic, partition = parse_app_id(app) or (app, -1)
        by_topic.setdefault(topic, []).append((partition, version))
    texts = [f"{t}@" + ",".join(f"{p}:{v}" for p, v in sorted(parts)) for t, parts in sorted(by_topic.items())]
    return " ".join(texts) or "the topics' beginning"


def migrate(
    source: str | Path,
    root: str | Path,
    *,
    completions_topic: str = COMPLETIONS_TOPIC,
) -> MigrationReport:
    """Copy the old store at `source` into the tables under `root`, verify, and report.

    Raises MigrationError when `source` is no old store or is being written, when a table
    under `root` holds data from elsewhere, or when verification finds a difference.
    """
    src = Path(source).resolve()
    if not (src / LEGACY_INDEX).is_file():
        raise MigrationError(f"no store of the old format at {src}: {LEGACY_INDEX} is missing")
    same = not is_url(root) and Path(root).resolve() == src
    with _old_store_stopped(src), closing(_open_index(src)) as db:
        # One read transaction: positions, pending, manifest and index are of one commit.
        db.execute("BEGIN")
        old = _OldStore(src, db, completions_topic)
        _refuse_foreign_data(root, old)
        tables = ensure_tables(root)
        report = MigrationReport(
            source=str(src),
            root=str(root),
            same_folder=same,
            feedback_topic=old.feedback_topic,
            completions_topic=completions_topic,
            tables={},
            pending=old.pending(),
            ratings_unmatched=0,
            completions_unmatched=0,
            anchors_copied=False,
            legacy_files=[],
        )
        plan: list[tuple[str, pa.Schema, Callable[[], Iterator[pa.RecordBatch]], dict]] = [
            (COMPLETIONS, COMPLETIONS_SCHEMA, old.completions, old.completion_versions()),
            (PAIRS, PAIRS_SCHEMA, old.pairs, old.feedback_versions()),
            (JUDGEMENTS, JUDGEMENTS_SCHEMA, lambda: old.judgements(report), old.feedback_versions()),
        ]
        for name, schema, batches, marks in plan:
            report.tables[name] = _copy(tables[name], name, schema, batches, marks, src)
        db.execute("COMMIT")
    report.anchors_copied = _copy_anchors(src, root, same)
    report.legacy_files = legacy_files(src)
    return report


# --- the old store ---


@contextmanager
def _old_store_stopped(src: Path) -> Iterator[None]:
    """Hold the old store's lock (shared) while reading it: it must not write meanwhile."""
    lock = src / LEGACY_LOCK
    if not lock.exists():  # a store that never ran holds no lock file
        yield
        return
    fd = os.open(lock, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise MigrationError(f"the old store at {src} is running (it holds {lock}): stop it first") from None
        yield
    finally:
        os.close(fd)


def _open_index(src: Path) -> sqlite3.Connection:
    # Not `mode=ro`: a read-only connection leaves -wal/-shm files behind in the old folder.
    # Batches are pulled by delta-rs from its own thread, hence check_same_thread=False.
    conn = sqlite3.connect(src / LEGACY_INDEX, isolation_level=None, timeout=30.0, check_same_thread=False)
    conn.execute("PRAGMA query_only=1")
    return conn


class _OldStore:
    """Reads of one old store, within the caller's read transaction."""

    def __init__(self, src: Path, db: sqlite3.Connection, completions_topic: str) -> None:
        self.src, self.db, self.completions_topic = src, db, completions_topic
        row = db.execute("SELECT value FROM meta WHERE key = 'feedback_topic'").fetchone()
        self.feedback_topic = row[0] if row else FEEDBACK_TOPIC
        self.positions = {
            (t, int(p)): int(o) for t, p, o in db.execute("SELECT topic, partition, next_offset FROM positions")
        }
        strange = sorted({t for t, _ in self.positions} - {self.feedback_topic, completions_topic})
        if strange:
            raise MigrationError(
                f"{src / LEGACY_INDEX} has positions of topic(s) {strange}, neither its feedback topic "
                f"{self.feedback_topic!r} nor the completions topic {completions_topic!r} (--completions-topic)"
            )

    def completion_versions(self) -> dict[tuple[str, int], int]:
        return {k: o for k, o in self.positions.items() if k[0] == self.completions_topic}

    def feedback_versions(self) -> dict[tuple[str, int], int]:
        """The old `watermarks()`: the position, held back by the oldest pending record."""
        rows = self.db.execute(
            """SELECT p.partition, MIN(p.next_offset, COALESCE(
                   (SELECT MIN(q."offset") FROM pending q WHERE q.topic = p.topic AND q.partition = p.partition),
                   p.next_offset))
               FROM positions p WHERE p.topic = ?""",
            (self.feedback_topic,),
        )
        return {(self.feedback_topic, int(p)): int(o) for p, o in rows}

    def pending(self) -> dict[int, int]:
        rows = self.db.execute(
            "SELECT partition, COUNT(*) FROM pending WHERE topic = ? GROUP BY partition", (self.feedback_topic,)
        )
        return {int(p): int(n) for p, n in rows}

    def manifest(self, folder: str) -> list[Path]:
        out = []
        for (files,) in self.db.execute("SELECT files FROM commits ORDER BY seq"):
            out.extend(self.src / f for f in json.loads(files) if f.startswith(folder + "/"))
        missing = [str(p) for p in out if not p.is_file()]
        if missing:
            raise MigrationError(f"the old manifest names {len(missing)} missing file(s), first {missing[0]}")
        return out

    def completions(self) -> Iterator[pa.RecordBatch]:
        cursor = self.db.execute(
            "SELECT completion_id, request_id, conversation_id, tenant, prompt, prompt_key, rendered_prompt, "
            'text, model, topic, partition, "offset" FROM completions ORDER BY rowid'
        )
        while chunk := cursor.fetchmany(_CHUNK):
            rows = [dict(zip(_COMPLETION_COLUMNS, r, strict=True)) for r in chunk]
            yield pa.RecordBatch.from_pylist(rows, COMPLETIONS_SCHEMA)

    def pairs(self) -> Iterator[pa.RecordBatch]:
        # The old rows' columns are the pairs table's, in the same order; those added since
        # (tables.ADDED_COLUMNS) read as null.
        for path in self.manifest(LEGACY_ROWS):
            yield from pq.read_table(path, schema=PAIRS_SCHEMA).to_batches()

    def judgements(self, report: MigrationReport) -> Iterator[pa.RecordBatch]:
        ratings = {
            r[0]: dict(zip(_RATING_COLUMNS, r[1:], strict=True))
            for r in self.db.execute(
                "SELECT event_id, request_id, prompt_key, value, scale_min, scale_max FROM ratings"
            )
        }
        for path in self.manifest(LEGACY_JUDGEMENTS):
            rows = pq.read_table(path, schema=_OLD_JUDGEMENTS_SCHEMA).to_pylist()
            firsts = self._requests({r["completion_ids"][0] for r in rows if r["completion_ids"]})
            for row in rows:
                row.update(dict.fromkeys(_RATING_COLUMNS))
                if row["kind"] in _RATING_KINDS:
                    # Without its value a rating must not look like one (no prompt_key):
                    # the consumer would pair it with later ratings.
                    found = ratings.get(row["event_id"])
                    report.ratings_unmatched += found is None
                    row.update(found or {})
                else:
                    # The old files keep completion ids sorted, not in the event's order.
                    first = firsts.get(row["completion_ids"][0]) if row["completion_ids"] else None
                    report.completions_unmatched += first is None
                    row.update(first or {})
            yield from pa.Table.from_pylist(rows, schema=JUDGEMENTS_SCHEMA).to_batches()

    def _requests(self, ids: Iterable[str]) -> dict[str, dict]:
        ids, out = list(ids), {}
        for start in range(0, len(ids), 500):
            part = ids[start : start + 500]
            for cid, request_id, prompt_key in self.db.execute(
                "SELECT completion_id, request_id, prompt_key FROM completions "
                f"WHERE completion_id IN ({','.join('?' * len(part))})",
                part,
            ):
                out[cid] = {"request_id": request_id, "prompt_key": prompt_key}
        return out


def legacy_files(root: str | Path) -> list[str]:
    """Files of an old-format store under the folder `root` (relative paths; [] for URLs)."""
    if is_url(root):
        return []
    base = Path(root)
    found = [LEGACY_INDEX] if (base / LEGACY_INDEX).is_file() else []
    found += [f"{LEGACY_INDEX}{s}" for s in ("-wal", "-shm") if (base / f"{LEGACY_INDEX}{s}").is_file()]
    for folder in (LEGACY_ROWS, LEGACY_JUDGEMENTS):
        # Old files are named by commit sequence; Delta's data files are `part-*`.
        found += sorted(f"{folder}/{p.name}" for p in (base / folder).glob("[0-9]*.parquet"))
    return found


# --- the new tables ---


def _refuse_foreign_data(root: str | Path, old: _OldStore) -> None:
    """Refuse tables holding rows or exactly-once marks, unless an earlier run of this
    migration wrote them (then this run verifies them)."""
    feedback = old.feedback_versions()
    marks = {COMPLETIONS: old.completion_versions(), PAIRS: feedback, JUDGEMENTS: feedback}
    for name, versions in marks.items():
        table = open_table(root, name)
        if table is None:
            continue
        rows = dataset(table).count_rows()
        held = sorted(a for a in (app_id(t, p) for t, p in versions) if table.transaction_version(a) is not None)
        if (rows or held) and _migrated_from(table) != str(old.src):
            what = f"{rows} rows" + (f" and positions of {', '.join(held)}" if held else "")
            raise MigrationError(
                f"table {table_uri(root, name)} already holds {what} (version {table.version()}): "
                "migrate into a root whose tables are empty"
            )


def _migrated_from(table: DeltaTable) -> str | None:
    for commit in table.history():
        if MIGRATED_FROM in commit:
            return str(commit[MIGRATED_FROM])
    return None


def _copy(
    table: DeltaTable,
    name: str,
    schema: pa.Schema,
    batches: Callable[[], Iterator[pa.RecordBatch]],
    marks: Mapping[tuple[str, int], int],
    src: Path,
) -> TableReport:
    """Append everything in one commit (unless an earlier run did), then verify it."""
    key = _KEYS[name]
    expected: Counter[tuple[str, bytes]] = Counter()

    def digested() -> Iterator[pa.RecordBatch]:
        for batch in batches():
            expected.update(_digests(batch, key))
            yield batch

    done = _migrated_from(table) == str(src)
    if done:
        for _ in digested():
            pass
    else:
        write_deltalake(
            table,
            pa.RecordBatchReader.from_batches(schema, digested()),
            mode="append",
            commit_properties=CommitProperties(
                app_transactions=[Transaction(app_id(t, p), int(v)) for (t, p), v in sorted(marks.items())],
                custom_metadata={"writer": "tuneloop-store/migrate", MIGRATED_FROM: str(src)},
            ),
        )
    table.update_incremental()
    _verify(table, name, key, expected, marks)
    return TableReport(
        name=name,
        rows=sum(expected.values()),
        version=table.version(),
        app_versions={app_id(t, p): int(v) for (t, p), v in sorted(marks.items())},
        already_migrated=done,
    )


def _digests(batch: pa.RecordBatch, key: str) -> Iterator[tuple[str, bytes]]:
    """(id, digest of every value) per row: equal values give equal digests."""
    for row in batch.to_pylist():
        values = repr(tuple(row[f] for f in batch.schema.names)).encode()
        yield row[key], hashlib.blake2b(values, digest_size=16).digest()


def _verify(
    table: DeltaTable, name: str, key: str, expected: Counter, marks: Mapping[tuple[str, int], int]
) -> None:
    actual: Counter[tuple[str, bytes]] = Counter()
    for batch in dataset(table).to_batches():
        actual.update(_digests(batch, key))
    problems = []
    ids = Counter(i for i, _ in actual.elements())
    problems += [f"{key} {i} stored {n} times" for i, n in ids.items() if n > 1]
    old_ids = {i for i, _ in expected}
    problems += [f"{key} {i} missing" for i in sorted(old_ids - set(ids))]
    problems += [f"{key} {i} not in the old store" for i in sorted(set(ids) - old_ids)]
    problems += [f"{key} {i} has other values" for i, _ in sorted(set(expected) - set(actual)) if i in ids]
    for (topic, partition), version in sorted(marks.items()):
        found = table.transaction_version(app_id(topic, partition))
        if found != version:
            problems.append(f"{app_id(topic, partition)} is at {found}, not {version}")
    if problems:
        more = f" (and {len(problems) - _MAX_PROBLEMS} more)" if len(problems) > _MAX_PROBLEMS else ""
        raise MigrationError(f"{name}: verification failed: {'; '.join(problems[:_MAX_PROBLEMS])}{more}")


def _copy_anchors(src: Path, root: str | Path, same: bool) -> bool:
    """The agreement's known answers live beside the tables (read.anchors_text)."""
    if same or is_url(root) or not (src / ANCHORS_FILE).is_file() or (Path(root) / ANCHORS_FILE).exists():
        return False
    shutil.copy2(src / ANCHORS_FILE, Path(root) / ANCHORS_FILE)
    return True
