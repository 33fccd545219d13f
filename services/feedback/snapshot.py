"""The preference store on disk, its snapshots, and export to TRL's preference format.

Layout under the store root:

    index.sqlite                      completion index, seen event ids, pending feedback,
                                      consumed positions, and the manifest (files per commit)
    rows/<commit>.parquet             training rows written by one commit
    judgements/<commit>.parquet       raw judgements (one row per stored event) of that commit
    anchors.json                      optional known answers for anchor items (agreement.py)

One SQLite transaction per commit is the store's only durability point: a Parquet file is
written under a temporary name, fsynced and renamed first, and counts only once the
transaction listing it in the manifest has committed. Readers read manifest files only, so
a crash between rename and commit leaves a file no reader sees (the store deletes it at start).

A snapshot is, per partition of the feedback topic, the offset below which every record is
final: stored as rows, dead-lettered, or a duplicate. A record still waiting for its completion
holds its partition's watermark back, so the rows at a snapshot never change afterwards,
and every row records the offset of the event it came from, which is how `load_rows` selects
them. A snapshot's text id is `OffsetSnapshot`'s: `tuneloop.feedback.v1@0:12,1:40,2:7`.
"""

from __future__ import annotations

import json
import os
import sqlite3
import uuid
from collections.abc import Mapping
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from tuneloop.common.durable import fsync_dir
from tuneloop.common.kafka import FEEDBACK_TOPIC, OffsetSnapshot
from tuneloop.feedback.pairs import BOTH_BAD, PREFERENCE, TIE

if TYPE_CHECKING:
    from datasets import Dataset

INDEX_FILE = "index.sqlite"
ROWS_DIR, JUDGEMENTS_DIR = "rows", "judgements"

INDEX_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS completions (
    completion_id TEXT PRIMARY KEY, request_id TEXT NOT NULL, conversation_id TEXT NOT NULL,
    tenant TEXT NOT NULL, prompt BLOB NOT NULL, prompt_key TEXT NOT NULL,
    rendered_prompt TEXT NOT NULL, text TEXT NOT NULL, model TEXT NOT NULL,
    topic TEXT NOT NULL, partition INTEGER NOT NULL, "offset" INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS seen_events (event_id TEXT PRIMARY KEY, commit_seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS pending (
    topic TEXT NOT NULL, partition INTEGER NOT NULL, "offset" INTEGER NOT NULL,
    key BLOB, value BLOB, first_seen REAL NOT NULL, PRIMARY KEY (topic, partition, "offset"));
CREATE TABLE IF NOT EXISTS positions (
    topic TEXT NOT NULL, partition INTEGER NOT NULL, next_offset INTEGER NOT NULL,
    PRIMARY KEY (topic, partition));
CREATE TABLE IF NOT EXISTS ratings (
    event_id TEXT NOT NULL, completion_id TEXT NOT NULL, tenant TEXT NOT NULL,
    annotator_id TEXT NOT NULL, request_id TEXT NOT NULL, prompt_key TEXT NOT NULL,
    kind TEXT NOT NULL, value REAL NOT NULL, scale_min REAL NOT NULL, scale_max REAL NOT NULL);
CREATE INDEX IF NOT EXISTS ratings_by_prompt ON ratings (tenant, kind, prompt_key);
CREATE TABLE IF NOT EXISTS commits (
    seq INTEGER PRIMARY KEY, committed_at REAL NOT NULL, files TEXT NOT NULL, snapshot TEXT NOT NULL);
"""

_MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
_TS = pa.timestamp("us", tz="UTC")

ROWS_SCHEMA = pa.schema(
    [
        ("row_id", pa.string()),
        ("event_id", pa.string()),
        ("source_event_ids", pa.list_(pa.string())),
        ("item_id", pa.string()),
        ("tenant", pa.string()),
        ("project", pa.string()),
        ("source", pa.string()),
        ("annotator_id", pa.string()),
        ("kind", pa.string()),
        ("rule", pa.string()),
        ("label", pa.string()),
        ("prompt", pa.list_(_MESSAGE)),
        ("prompt_raw", pa.string()),
        ("rendered_prompt", pa.string()),
        ("chosen", pa.string()),
        ("rejected", pa.string()),
        ("chosen_id", pa.string()),
        ("rejected_id", pa.string()),
        ("chosen_model", pa.string()),
        ("rejected_model", pa.string()),
        ("criteria", pa.list_(pa.string())),
        ("weight", pa.float64()),
        ("calibration", pa.bool_()),
        ("anchor", pa.bool_()),
        ("created_at", _TS),
        ("topic", pa.string()),
        ("partition", pa.int32()),
        ("offset", pa.int64()),
    ]
)

JUDGEMENTS_SCHEMA = pa.schema(
    [
        ("event_id", pa.string()),
        ("item_id", pa.string()),
        ("tenant", pa.string()),
        ("project", pa.string()),
        ("source", pa.string()),
        ("annotator_id", pa.string()),
        ("kind", pa.string()),
        ("choice", pa.string()),
        ("score", pa.float64()),
        ("completion_ids", pa.list_(pa.string())),
        ("criteria", pa.list_(pa.string())),
        ("marks", pa.string()),
        ("comment", pa.string()),
        ("calibration", pa.bool_()),
        ("anchor", pa.bool_()),
        ("created_at", _TS),
        ("topic", pa.string()),
        ("partition", pa.int32()),
        ("offset", pa.int64()),
    ]
)

Policy = Literal["drop", "keep"]


def open_index(root: Path) -> sqlite3.Connection:
    """The index, created if missing. Autocommit mode: writers open transactions explicitly.

    WAL lets readers (reports, exports) run while the store writes; synchronous=FULL makes
    each commit durable when COMMIT returns.
    """
    root.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(root / INDEX_FILE, isolation_level=None, timeout=30.0)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.executescript(INDEX_SCHEMA)
    return conn


def _read_index(root: Path) -> sqlite3.Connection | None:
    if not (Path(root) / INDEX_FILE).is_file():
        return None
    conn = sqlite3.connect(Path(root) / INDEX_FILE, isolation_level=None, timeout=30.0)
    conn.execute("PRAGMA query_only=1")
    return conn


def write_parquet(table: pa.Table, path: Path) -> None:
    """Write `table` so that `path` either does not exist or holds all of it, durably."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    pq.write_table(table, tmp)
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def manifest_files(conn: sqlite3.Connection, folder: str) -> list[str]:
    """Relative paths of the committed files under `folder`, in commit order."""
    out = []
    for (files,) in conn.execute("SELECT files FROM commits ORDER BY seq"):
        out.extend(f for f in json.loads(files) if f.startswith(folder + "/"))
    return out


def watermarks(conn: sqlite3.Connection, topic: str) -> dict[int, int]:
    """Per partition of `topic`: the consumed position, held back by the oldest pending record."""
    rows = conn.execute(
        """SELECT p.partition, MIN(p.next_offset, COALESCE(
               (SELECT MIN(q."offset") FROM pending q WHERE q.topic = p.topic AND q.partition = p.partition),
               p.next_offset))
           FROM positions p WHERE p.topic = ? ORDER BY p.partition""",
        (topic,),
    )
    return {int(p): int(o) for p, o in rows}


def feedback_topic(conn: sqlite3.Connection) -> str:
    row = conn.execute("SELECT value FROM meta WHERE key = 'feedback_topic'").fetchone()
    return row[0] if row else FEEDBACK_TOPIC


def current_snapshot(root: Path | str) -> dict[int, int]:
    """The newest snapshot: feedback-topic partition -> offset ({} for an empty store)."""
    conn = _read_index(Path(root))
    if conn is None:
        return {}
    with closing(conn):
        conn.execute("BEGIN")
        return watermarks(conn, feedback_topic(conn))


def snapshot_id(root: Path | str, snapshot: Mapping[int, int]) -> str:
    """Text id of a snapshot of this store, e.g. `tuneloop.feedback.v1@0:12,1:40`."""
    conn = _read_index(Path(root))
    if conn is None:
        return OffsetSnapshot(FEEDBACK_TOPIC, dict(snapshot)).id
    with closing(conn):
        return OffsetSnapshot(feedback_topic(conn), dict(snapshot)).id


def parse_snapshot(text: str) -> dict[int, int]:
    """Offsets of a snapshot id (`topic@p:o,...`); `topic@` alone is the empty snapshot."""
    if text.endswith("@") and "@" not in text[:-1]:
        return {}
    return dict(OffsetSnapshot.parse(text).offsets)


def _read(root: Path, files: list[str], schema: pa.Schema) -> pd.DataFrame:
    if not files:
        return schema.empty_table().to_pandas()
    return pa.concat_tables([pq.read_table(root / f, schema=schema) for f in files]).to_pandas()


def load_rows(root: Path | str, snapshot: Mapping[int, int] | Mapping[str, int] | None = None) -> pd.DataFrame:
    """Exactly the training rows at `snapshot` (None: the current one), in commit order.

    A row belongs to a snapshot when its feedback-topic offset is below the snapshot's offset
    for its partition; partitions absent from the snapshot contribute nothing.
    """
    root = Path(root)
    conn = _read_index(root)
    if conn is None:
        return ROWS_SCHEMA.empty_table().to_pandas()
    with closing(conn):
        # One read transaction: the manifest and the watermarks are of the same commit.
        conn.execute("BEGIN")
        files = manifest_files(conn, ROWS_DIR)
        current = watermarks(conn, feedback_topic(conn))
    wanted = current if snapshot is None else {int(p): int(o) for p, o in snapshot.items()}
    rows = _read(root, files, ROWS_SCHEMA)
    limits = rows["partition"].map(lambda p: wanted.get(int(p), 0))
    return rows[rows["offset"] < limits].reset_index(drop=True)


def load_judgements(root: Path | str) -> pd.DataFrame:
    """Every stored judgement (one row per accepted feedback event)."""
    root = Path(root)
    conn = _read_index(root)
    if conn is None:
        return JUDGEMENTS_SCHEMA.empty_table().to_pandas()
    with closing(conn):
        files = manifest_files(conn, JUDGEMENTS_DIR)
    return _read(root, files, JUDGEMENTS_SCHEMA)


def to_trl_dataset(rows: pd.DataFrame, tie_policy: Policy = "drop", both_bad_policy: Policy = "drop") -> Dataset:
    """Rows as a TRL preference dataset.

    Chat prompts give TRL's conversational format: `prompt` is the list of chat messages,
    `chosen` and `rejected` are one assistant message each. Raw prompts give the standard
    format (three strings). One dataset is one format: mixed rows raise ValueError.

    Ties and both-bad pairs are dropped, or kept (policy "keep") with their `label` column
    saying so; chosen/rejected of such a row are the order shown (A, B), not a preference,
    so a trainer that keeps them must read `label` (e.g. a tie-aware loss, or both as
    negatives against a better answer). Extra columns: label, weight, row_id, event_id,
    item_id, annotator_id, rule.
    """
    from datasets import Dataset, Features, Value

    labels = (
        {PREFERENCE} | ({TIE} if tie_policy == "keep" else set()) | ({BOTH_BAD} if both_bad_policy == "keep" else set())
    )
    for name, policy in (("tie_policy", tie_policy), ("both_bad_policy", both_bad_policy)):
        if policy not in ("drop", "keep"):
            raise ValueError(f"{name} must be 'drop' or 'keep', not {policy!r}")
    kept = rows[rows["label"].isin(labels)]
    chat = kept["prompt"].map(len) > 0
    if chat.any() and not chat.all():
        raise ValueError("rows mix chat and raw prompts; export them separately (filter on prompt_raw)")
    conversational = bool(chat.all())
    extra = {
        "label": list(kept["label"]),
        "weight": [float(w) for w in kept["weight"]],
        "row_id": list(kept["row_id"]),
        "event_id": list(kept["event_id"]),
        "item_id": list(kept["item_id"]),
        "annotator_id": list(kept["annotator_id"]),
        "rule": list(kept["rule"]),
    }
    extra_features = {k: Value("float64" if k == "weight" else "string") for k in extra}
    if conversational:
        message = {"role": Value("string"), "content": Value("string")}
        data = {
            "prompt": [[{"role": m["role"], "content": m["content"]} for m in p] for p in kept["prompt"]],
            "chosen": [[{"role": "assistant", "content": t}] for t in kept["chosen"]],
            "rejected": [[{"role": "assistant", "content": t}] for t in kept["rejected"]],
        }
        features = Features({"prompt": [message], "chosen": [message], "rejected": [message], **extra_features})
    else:
        data = {"prompt": list(kept["prompt_raw"]), "chosen": list(kept["chosen"]), "rejected": list(kept["rejected"])}
        features = Features({k: Value("string") for k in data} | extra_features)
    return Dataset.from_dict({**data, **extra}, features=features)
