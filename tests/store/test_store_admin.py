"""The store's administration: migration of an old-format store (SQLite index + Parquet)
into the Delta tables, erasure of a tenant or a user down to the bytes on disk, compaction,
vacuum, and the `tuneloop store` commands. No Kafka: old stores are written directly."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable
from deltalake.exceptions import TableNotFoundError
from typer.testing import CliRunner

from tuneloop.cli import app as tuneloop_cli
from tuneloop.common.kafka import COMPLETIONS_TOPIC, FEEDBACK_TOPIC
from tuneloop.store import admin, migrate
from tuneloop.store.admin import AdminError, erase, read_erasures
from tuneloop.store.migrate import MigrationError
from tuneloop.store.read import load_completions, load_judgements, load_rows
from tuneloop.store.tables import (
    COMPLETIONS,
    COMPLETIONS_SCHEMA,
    JUDGEMENTS,
    PAIRS,
    PAIRS_SCHEMA,
    TABLES,
    append,
    ensure_tables,
    open_table,
    partition_version,
    table_uri,
)
from tuneloop.v1 import completion_pb2

# --- the old format, as services/feedback/snapshot.py defined it (commit 739e257) ---

OLD_INDEX_SCHEMA = """
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

OLD_ROWS_SCHEMA = pa.schema(
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

OLD_JUDGEMENTS_SCHEMA = pa.schema(
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

# Texts that must be gone from disk after an erasure (grep-able, and unique to their owner).
BOB = "bob-7f3a"  # an acme annotator
BOB_COMMENT = "bob-private-remark-q9z"
GLOBEX = "globex"
GLOBEX_TEXT = "globex-confidential-answer"
WHEN = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


@dataclass
class OldStore:
    """What a test wrote in the old format, to compare the migration with."""

    root: Path
    completions: dict[str, dict] = field(default_factory=dict)
    rows: list[dict] = field(default_factory=list)
    judgements: list[dict] = field(default_factory=list)
    ratings: dict[str, dict] = field(default_factory=dict)
    commits: list[tuple[list[dict], list[dict]]] = field(default_factory=list)


def _completion(store: OldStore, cid: str, tenant: str, request: str, text: str, offset: int) -> None:
    prompt = completion_pb2.Prompt(raw=f"question of {request}").SerializeToString(deterministic=True)
    store.completions[cid] = {
        "completion_id": cid, "request_id": request, "conversation_id": f"conv-{request}", "tenant": tenant,
        "prompt": prompt, "prompt_key": hashlib.sha256(prompt).hexdigest(), "rendered_prompt": f"<q>{request}</q>",
        "text": text, "model": "policy@3", "topic": COMPLETIONS_TOPIC, "partition": 0, "offset": offset,
    }


def _judgement(store: OldStore, event: str, tenant: str, annotator: str, kind: str, ids: list[str], *,
               partition: int, offset: int, choice: str = "", score: float | None = None,
               comment: str = "") -> dict:
    row = {
        "event_id": event, "item_id": f"item-{ids[0]}", "tenant": tenant, "project": "p1", "source": "annotator",
        "annotator_id": annotator, "kind": kind, "choice": choice, "score": score, "completion_ids": sorted(ids),
        "criteria": ["helpful"], "marks": "[]", "comment": comment, "calibration": False, "anchor": False,
        "created_at": WHEN, "topic": FEEDBACK_TOPIC, "partition": partition, "offset": offset,
    }
    store.judgements.append(row)
    return row


def _row(store: OldStore, judgement: dict, n: int, chosen: str, rejected: str, rule: str,
         sources: list[str] | None = None) -> dict:
    c, r = store.completions[chosen], store.completions[rejected]
    row = {
        **{k: judgement[k] for k in ("event_id", "item_id", "tenant", "project", "source", "annotator_id", "kind",
                                     "criteria", "calibration", "anchor", "created_at", "topic", "partition",
                                     "offset")},
        "row_id": f"{judgement['event_id']}#{n}", "source_event_ids": sources or [judgement["event_id"]],
        "rule": rule, "label": "preference", "prompt": [], "prompt_raw": f"question of {c['request_id']}",
        "rendered_prompt": c["rendered_prompt"], "chosen": c["text"], "rejected": r["text"], "chosen_id": chosen,
        "rejected_id": rejected, "chosen_model": c["model"], "rejected_model": r["model"], "weight": 1.0,
    }
    store.rows.append(row)
    return row


def _rating(store: OldStore, judgement: dict, value: float) -> None:
    c = store.completions[judgement["completion_ids"][0]]
    store.ratings[judgement["event_id"]] = {
        "event_id": judgement["event_id"], "completion_id": c["completion_id"], "tenant": judgement["tenant"],
        "annotator_id": judgement["annotator_id"], "request_id": c["request_id"], "prompt_key": c["prompt_key"],
        "kind": "thumb" if judgement["kind"] == "thumbs" else "score", "value": value, "scale_min": 1.0,
        "scale_max": 7.0,
    }


def build_old_store(root: Path) -> OldStore:
    """Two tenants; acme has annotators bob and carol (a rating pair of carol's uses bob's
    event); globex has its own bob; feedback partition 1 has an event still pending."""
    s = OldStore(root)
    for i, (cid, tenant, req, text) in enumerate([
        ("c1", "acme", "r1", "acme answer one"), ("c2", "acme", "r1", "acme answer two"),
        ("c3", "acme", "r2", "acme answer three"), ("c4", "acme", "r2", "acme answer four"),
        ("g1", GLOBEX, "r9", f"{GLOBEX_TEXT} alpha"), ("g2", GLOBEX, "r9", f"{GLOBEX_TEXT} beta"),
    ]):
        _completion(s, cid, tenant, req, text, offset=i)
    first_rows, first_judgements = len(s.rows), len(s.judgements)
    j = _judgement(s, "e-bob-1", "acme", BOB, "pairwise", ["c2", "c1"], partition=0, offset=0, choice="c1",
                   comment=BOB_COMMENT)
    _row(s, j, 0, "c1", "c2", "pairwise")
    j = _judgement(s, "e-carol-1", "acme", "carol", "ranking", ["c1", "c2"], partition=0, offset=1,
                   choice="c2>c1")
    _row(s, j, 0, "c2", "c1", "ranking")
    j = _judgement(s, "e-bob-2", "acme", BOB, "rating", ["c3"], partition=1, offset=0, choice="6", score=6.0)
    _rating(s, j, 6.0)
    s.commits.append((s.rows[first_rows:], s.judgements[first_judgements:]))
    first_rows, first_judgements = len(s.rows), len(s.judgements)
    j = _judgement(s, "e-carol-2", "acme", "carol", "rating", ["c4"], partition=1, offset=1, choice="2", score=2.0)
    _rating(s, j, 2.0)
    _row(s, j, 0, "c3", "c4", "rating", sources=["e-bob-2", "e-carol-2"])  # bob's event in carol's pair
    j = _judgement(s, "e-gx-1", GLOBEX, BOB, "pairwise", ["g1", "g2"], partition=0, offset=2, choice="g2")
    _row(s, j, 0, "g2", "g1", "pairwise")
    j = _judgement(s, "e-gx-2", GLOBEX, "gina", "thumbs", ["g1"], partition=0, offset=3, choice="up")
    _rating(s, j, 1.0)
    # A rating the old index lost, and a pairwise naming a completion it never saw.
    _judgement(s, "e-odd-1", "acme", "carol", "thumbs", ["c1"], partition=1, offset=3, choice="down")
    _judgement(s, "e-odd-2", "acme", "carol", "pairwise", ["c1", "aa-unknown"], partition=1, offset=4, choice="tie")
    s.commits.append((s.rows[first_rows:], s.judgements[first_judgements:]))
    _write_old(s)
    return s


def _write_old(s: OldStore) -> None:
    s.root.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(s.root / "index.sqlite", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript(OLD_INDEX_SCHEMA)
    db.execute("INSERT INTO meta VALUES ('feedback_topic', ?)", (FEEDBACK_TOPIC,))
    db.executemany("INSERT INTO completions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                   [tuple(c.values()) for c in s.completions.values()])
    db.executemany("INSERT INTO ratings VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                   [tuple(r.values()) for r in s.ratings.values()])
    db.executemany("INSERT INTO seen_events VALUES (?, 1)", [(j["event_id"],) for j in s.judgements])
    db.executemany("INSERT INTO positions VALUES (?, ?, ?)", [
        (FEEDBACK_TOPIC, 0, 4), (FEEDBACK_TOPIC, 1, 6), (COMPLETIONS_TOPIC, 0, 6), (COMPLETIONS_TOPIC, 1, 0),
    ])
    # Partition 1, offset 2: feedback whose completion had not arrived; it holds the watermark at 2.
    db.execute("INSERT INTO pending VALUES (?, 1, 2, NULL, ?, 0)", (FEEDBACK_TOPIC, b"waiting"))
    for seq, (rows, judgements) in enumerate(s.commits, start=1):
        files = []
        for folder, data, schema in (("rows", rows, OLD_ROWS_SCHEMA), ("judgements", judgements,
                                                                       OLD_JUDGEMENTS_SCHEMA)):
            if data:
                rel = f"{folder}/{seq:012d}.parquet"
                (s.root / folder).mkdir(exist_ok=True)
                pq.write_table(pa.Table.from_pylist(data, schema=schema), s.root / rel)
                files.append(rel)
        db.execute("INSERT INTO commits VALUES (?, 0, ?, '{}')", (seq, json.dumps(files)))
    db.close()
    # A file of a commit that never landed: no reader of the old store saw it.
    pq.write_table(pa.Table.from_pylist([{**s.rows[0], "row_id": "ghost#0"}], schema=OLD_ROWS_SCHEMA),
                   s.root / "rows" / "000000000099.parquet")


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def holders(root: Path, text: str) -> list[str]:
    """Files under the table folders holding `text`: in their bytes, or, for Parquet files
    (compressed, so bytes alone could miss it), in any decoded value."""
    found = []
    for name in TABLES:
        for path in sorted((root / name).rglob("*")):
            if not path.is_file():
                continue
            hit = text.encode() in path.read_bytes()
            if not hit and path.suffix == ".parquet":
                hit = text in repr(pq.read_table(path).to_pylist())
            if hit:
                found.append(str(path.relative_to(root)))
    return found


@pytest.fixture
def old(tmp_path: Path) -> OldStore:
    return build_old_store(tmp_path / "old")


@pytest.fixture
def migrated(old: OldStore, tmp_path: Path) -> Iterator[tuple[OldStore, Path]]:
    root = tmp_path / "new"
    migrate.migrate(old.root, root)
    yield old, root


# --- migration ---


def test_migration_copies_every_row_with_equal_values(old: OldStore, tmp_path: Path) -> None:
    root = tmp_path / "new"
    report = migrate.migrate(old.root, root)

    rows = load_rows(root)
    assert sorted(rows["row_id"]) == sorted(r["row_id"] for r in old.rows)  # not the uncommitted ghost
    by_id = {r["row_id"]: r for r in rows.to_dict("records")}
    for want in old.rows:
        got = by_id[want["row_id"]]
        for column in ("source_event_ids", "criteria"):
            assert list(got[column]) == want[column]
        assert got["created_at"].to_pydatetime() == WHEN
        assert {k: got[k] for k in ("chosen", "rejected", "tenant", "annotator_id", "offset", "weight")} == {
            k: want[k] for k in ("chosen", "rejected", "tenant", "annotator_id", "offset", "weight")}

    completions = load_completions(root).set_index("completion_id")
    assert sorted(completions.index) == sorted(old.completions)
    assert completions.loc["g1", "prompt"] == old.completions["g1"]["prompt"]
    assert completions.loc["g1", "text"] == old.completions["g1"]["text"]

    assert report.tables[PAIRS].rows == len(old.rows)
    assert report.tables[JUDGEMENTS].rows == len(old.judgements)
    assert report.tables[COMPLETIONS].rows == len(old.completions)
    assert report.pending == {1: 1}
    assert "verified" in report.summary()
    # One commit per table after its creation.
    assert {name: open_table(root, name).version() for name in TABLES} == {n: 1 for n in TABLES}


def test_judgements_gain_the_rating_columns(migrated: tuple[OldStore, Path]) -> None:
    old, root = migrated
    j = load_judgements(root).set_index("event_id")
    rated = j.loc["e-bob-2"]
    assert (rated["value"], rated["scale_min"], rated["scale_max"]) == (6.0, 1.0, 7.0)
    assert rated["prompt_key"] == old.completions["c3"]["prompt_key"] and rated["request_id"] == "r2"
    assert j.loc["e-gx-2", "value"] == 1.0
    pairwise = j.loc["e-bob-1"]  # not a rating: request and prompt of its first completion, no value
    assert (pairwise["request_id"], pairwise["prompt_key"]) == ("r1", old.completions["c1"]["prompt_key"])
    assert pairwise["value"] is None or pairwise["value"] != pairwise["value"]
    # A rating without its row in `ratings` must not look like one: nothing to pair it by.
    assert j.loc["e-odd-1", ["request_id", "prompt_key", "value"]].isna().all()
    assert j.loc["e-odd-2", ["request_id", "prompt_key"]].isna().all()  # unknown completion
    assert j.loc["e-carol-1", "comment"] == "" and j.loc["e-bob-1", "comment"] == BOB_COMMENT


def test_migration_report_counts_what_it_could_not_fill(old: OldStore, tmp_path: Path) -> None:
    report = migrate.migrate(old.root, tmp_path / "new")
    assert (report.ratings_unmatched, report.completions_unmatched) == (1, 1)


def test_tables_resume_where_the_old_store_stopped(migrated: tuple[OldStore, Path]) -> None:
    """Completions at the consumed positions; feedback at the watermarks, partition 1 held
    back by its pending event, so the new consumer reads it again from Kafka."""
    _, root = migrated
    completions, pairs, judgements = (open_table(root, n) for n in (COMPLETIONS, PAIRS, JUDGEMENTS))
    assert partition_version(completions, COMPLETIONS_TOPIC, 0) == 6
    assert partition_version(completions, COMPLETIONS_TOPIC, 1) == 0
    assert partition_version(completions, FEEDBACK_TOPIC, 0) is None
    for table in (pairs, judgements):
        assert partition_version(table, FEEDBACK_TOPIC, 0) == 4
        assert partition_version(table, FEEDBACK_TOPIC, 1) == 2
        assert partition_version(table, COMPLETIONS_TOPIC, 0) is None


def test_migration_into_the_same_folder_leaves_the_old_files_untouched(old: OldStore) -> None:
    before = _files(old.root)
    report = migrate.migrate(old.root, old.root)
    after = _files(old.root)
    assert {k: v for k, v in after.items() if k in before} == before
    new = [k for k in after if k not in before]
    assert new and all(k.split("/")[0] in TABLES for k in new)
    assert report.same_folder and "index.sqlite" in report.legacy_files
    assert "judgements/000000000001.parquet" in report.legacy_files
    assert len(load_rows(old.root)) == len(old.rows)
    # The old judgement files share the new table's folder: a full vacuum would delete them.
    with pytest.raises(AdminError, match="judgements/000000000001.parquet"):
        admin.vacuum(old.root)
    with pytest.raises(AdminError, match="cannot remove data"):
        erase(old.root, GLOBEX)
    assert _files(old.root).keys() >= before.keys()


def test_migration_refuses_tables_holding_other_data(old: OldStore, tmp_path: Path) -> None:
    root = tmp_path / "new"
    tables = ensure_tables(root)
    append(tables[PAIRS], pa.Table.from_pylist([{**old.rows[0], "row_id": "other#0"}], schema=PAIRS_SCHEMA),
           {(FEEDBACK_TOPIC, 0): 1})
    with pytest.raises(MigrationError, match=r"pairs already holds 1 rows.*tuneloop.store/tuneloop.feedback.v1/0"):
        migrate.migrate(old.root, root)
    assert open_table(root, COMPLETIONS).version() == 0  # nothing written before the refusal


def test_migration_refuses_positions_without_rows(old: OldStore, tmp_path: Path) -> None:
    root = tmp_path / "new"
    tables = ensure_tables(root)
    append(tables[COMPLETIONS], COMPLETIONS_SCHEMA.empty_table(), {(COMPLETIONS_TOPIC, 0): 3})
    with pytest.raises(MigrationError, match="completions already holds 0 rows and positions"):
        migrate.migrate(old.root, root)


def test_migration_run_again_verifies_instead_of_writing(migrated: tuple[OldStore, Path]) -> None:
    old, root = migrated
    report = migrate.migrate(old.root, root)
    assert all(t.already_migrated for t in report.tables.values())
    assert {name: open_table(root, name).version() for name in TABLES} == {n: 1 for n in TABLES}


def test_migration_verification_catches_a_lost_row(old: OldStore, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    real = migrate.write_deltalake

    def lossy(table, data, **kwargs):
        whole = pa.Table.from_batches(list(data), schema=data.schema)
        return real(table, whole.slice(1), **kwargs)

    monkeypatch.setattr(migrate, "write_deltalake", lossy)
    with pytest.raises(MigrationError, match="completions: verification failed: completion_id c1 missing"):
        migrate.migrate(old.root, tmp_path / "new")


def test_migration_needs_the_old_store_stopped(old: OldStore, tmp_path: Path) -> None:
    fd = os.open(old.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as the running old store holds it
        with pytest.raises(MigrationError, match="is running"):
            migrate.migrate(old.root, tmp_path / "new")
    finally:
        os.close(fd)
    migrate.migrate(old.root, tmp_path / "new")  # released: fine


def test_migration_of_a_folder_without_an_old_store(tmp_path: Path) -> None:
    with pytest.raises(MigrationError, match="index.sqlite is missing"):
        migrate.migrate(tmp_path, tmp_path / "new")


def test_anchors_travel_with_the_tables(old: OldStore, tmp_path: Path) -> None:
    (old.root / "anchors.json").write_text('{"item-c1": "c1"}')
    report = migrate.migrate(old.root, tmp_path / "new")
    assert report.anchors_copied and (tmp_path / "new" / "anchors.json").read_text() == '{"item-c1": "c1"}'


# --- erasure ---


def _counts(root: Path, tenant: str) -> dict[str, int]:
    return {
        "pairs": int((load_rows(root)["tenant"] == tenant).sum()),
        "judgements": int((load_judgements(root)["tenant"] == tenant).sum()),
        "completions": int((load_completions(root)["tenant"] == tenant).sum()),
    }


def test_tenant_erasure_leaves_no_byte_of_the_tenant(migrated: tuple[OldStore, Path],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    old, root = migrated
    acme = _counts(root, "acme")
    before = {name: open_table(root, name).version() for name in TABLES}
    assert holders(root, GLOBEX_TEXT) and holders(root, GLOBEX)  # the scan does see them

    # The delete's change-data files hold the deleted rows: they exist before the purge.
    change_data: list[str] = []
    real_purge = admin._purge

    def spy(table: DeltaTable) -> int:
        change_data.extend(h for h in holders(root, GLOBEX_TEXT) if "_change_data" in h)
        return real_purge(table)

    monkeypatch.setattr(admin, "_purge", spy)
    done = erase(root, GLOBEX)

    assert done.deleted == {"pairs": 1, "judgements": 2, "completions": 2}
    assert _counts(root, GLOBEX) == {"pairs": 0, "judgements": 0, "completions": 0}
    assert _counts(root, "acme") == acme
    assert change_data, "expected the delete to write change data (delta.enableChangeDataFeed)"
    assert holders(root, GLOBEX_TEXT) == []
    assert holders(root, GLOBEX) == []  # the log too: statistics and the delete's predicate
    # Older versions are gone; the exactly-once marks are kept.
    with pytest.raises(TableNotFoundError):
        DeltaTable(table_uri(root, PAIRS), version=before[PAIRS])
    assert partition_version(open_table(root, PAIRS), FEEDBACK_TOPIC, 1) == 2
    assert partition_version(open_table(root, COMPLETIONS), COMPLETIONS_TOPIC, 0) == 6
    # The erasure log names the versions a model card's lineage can no longer read.
    [entry] = read_erasures(root)
    assert entry["tenant"] == GLOBEX and entry["user_sha256"] is None
    assert entry["deleted"] == done.deleted
    assert entry["versions_before"] == before
    assert all(entry["versions_after"][n] > before[n] for n in TABLES)


def test_an_interrupted_erasure_is_finished_by_running_it_again(migrated: tuple[OldStore, Path],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    _, root = migrated
    real_purge = admin._purge

    def crash(table: DeltaTable) -> int:
        raise KeyboardInterrupt  # killed between the delete's commit and the purge

    monkeypatch.setattr(admin, "_purge", crash)
    with pytest.raises(KeyboardInterrupt):
        erase(root, GLOBEX)
    assert holders(root, GLOBEX_TEXT)  # deleted from the table, not yet from disk
    monkeypatch.setattr(admin, "_purge", real_purge)
    done = erase(root, GLOBEX)
    assert done.deleted == {"pairs": 0, "judgements": 2, "completions": 2}  # pairs went the first time
    assert holders(root, GLOBEX_TEXT) == [] and holders(root, GLOBEX) == []


def test_user_erasure_takes_their_judgements_and_every_pair_using_them(migrated: tuple[OldStore, Path]) -> None:
    old, root = migrated
    completions = len(load_completions(root))
    assert holders(root, BOB_COMMENT)

    done = erase(root, "acme", BOB)

    # bob's pairwise row, and carol's rating pair made with bob's rating; carol's ranking stays.
    assert done.deleted == {"pairs": 2, "judgements": 2, "completions": 0}
    rows = load_rows(root)
    assert sorted(rows["row_id"]) == ["e-carol-1#0", "e-gx-1#0"]
    judgements = load_judgements(root)
    assert not ((judgements["tenant"] == "acme") & (judgements["annotator_id"] == BOB)).any()
    # The user is erased within the tenant only: globex's own bob-7f3a keeps their judgement.
    assert "e-gx-1" in set(judgements["event_id"])
    assert len(load_completions(root)) == completions  # completions carry no user id
    assert holders(root, BOB_COMMENT) == []
    for event in ("e-bob-1", "e-bob-2"):
        assert holders(root, event) == [], event
    [entry] = read_erasures(root)
    assert entry["user_sha256"] == hashlib.sha256(BOB.encode()).hexdigest()
    assert BOB not in (root / "erasures.jsonl").read_text()  # the log keeps no erased identifier


def test_erasure_of_a_user_with_a_quote_in_their_id(migrated: tuple[OldStore, Path]) -> None:
    _, root = migrated
    tables = ensure_tables(root)
    row = {**load_rows(root).iloc[0].to_dict(), "row_id": "e-q#0", "event_id": "e-q", "annotator_id": "o'neil",
           "source_event_ids": ["e-q"], "tenant": "acme", "prompt": []}
    append(tables[PAIRS], pa.Table.from_pylist([row], schema=PAIRS_SCHEMA), {(FEEDBACK_TOPIC, 0): 4})
    assert erase(root, "acme", "o'neil").deleted["pairs"] == 1
    assert "e-q#0" not in set(load_rows(root)["row_id"])


def test_erasure_retries_when_a_writer_appends_meanwhile(migrated: tuple[OldStore, Path],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The consumer appending a row of the tenant between the erasure's look and its commit:
    Delta refuses the stale delete, the erasure looks again and deletes that row too."""
    old, root = migrated
    real = admin._predicate
    raced: list[str] = []

    def racing(name: str, tenant: str, user: str | None, tables: dict) -> object:
        make = real(name, tenant, user, tables)

        def predicate() -> str:
            text = make()
            if name == PAIRS and not raced:
                late = {**next(r for r in old.rows if r["tenant"] == GLOBEX), "row_id": "late#0", "offset": 7}
                append(open_table(root, PAIRS), pa.Table.from_pylist([late], schema=PAIRS_SCHEMA),
                       {(FEEDBACK_TOPIC, 0): 8})
                raced.append(text)
            return text

        return predicate

    monkeypatch.setattr(admin, "_predicate", racing)
    done = erase(root, GLOBEX)
    assert raced and done.deleted["pairs"] == 2
    assert _counts(root, GLOBEX)["pairs"] == 0
    assert partition_version(open_table(root, PAIRS), FEEDBACK_TOPIC, 0) == 8


def test_erasure_of_nobody_commits_nothing(migrated: tuple[OldStore, Path]) -> None:
    _, root = migrated
    before = {name: open_table(root, name).version() for name in TABLES}
    done = erase(root, "acme", "nobody")
    assert done.deleted == {"pairs": 0, "judgements": 0, "completions": 0}
    assert {name: open_table(root, name).version() for name in TABLES} == before
    assert len(read_erasures(root)) == 1  # the request is recorded all the same


def test_tables_take_appends_after_an_erasure(migrated: tuple[OldStore, Path]) -> None:
    old, root = migrated
    erase(root, GLOBEX)
    table = open_table(root, PAIRS)
    version = table.version()
    append(table, pa.Table.from_pylist([{**old.rows[0], "row_id": "later#0", "offset": 9}], schema=PAIRS_SCHEMA),
           {(FEEDBACK_TOPIC, 0): 10})
    table = open_table(root, PAIRS)
    assert partition_version(table, FEEDBACK_TOPIC, 0) == 10
    changes = pa.table(table.load_cdf(starting_version=version + 1))
    assert changes.column("row_id").to_pylist() == ["later#0"]


def test_a_second_erasure_reads_files_the_first_rewrote(migrated: tuple[OldStore, Path]) -> None:
    """delta-rs's delete writes string_view columns; erase must still find rows in them."""
    _, root = migrated
    erase(root, "acme", "carol")
    assert erase(root, "acme", BOB).deleted == {"pairs": 1, "judgements": 2, "completions": 0}
    assert erase(root, GLOBEX).deleted == {"pairs": 1, "judgements": 2, "completions": 2}


def test_read_api_filters_after_an_erasure(migrated: tuple[OldStore, Path]) -> None:
    _, root = migrated
    erase(root, GLOBEX)  # rewrites the completions file that also holds acme's completions
    assert sorted(load_completions(root, ["c1", "c2"])["completion_id"]) == ["c1", "c2"]


def test_erase_requires_a_tenant(migrated: tuple[OldStore, Path]) -> None:
    _, root = migrated
    with pytest.raises(ValueError, match="tenant"):
        erase(root, "")
    with pytest.raises(ValueError, match="user"):
        erase(root, "acme", "")


# --- upkeep ---


def test_compact_keeps_rows_and_positions(migrated: tuple[OldStore, Path]) -> None:
    old, root = migrated
    tables = ensure_tables(root)
    for n in range(3):
        append(tables[PAIRS], pa.Table.from_pylist([{**old.rows[0], "row_id": f"more#{n}"}], schema=PAIRS_SCHEMA),
               {(FEEDBACK_TOPIC, 0): 5 + n})
    rows = sorted(load_rows(root)["row_id"])
    files = len(open_table(root, PAIRS).file_uris())
    metrics = admin.compact(root)
    assert metrics[PAIRS]["numFilesRemoved"] == files
    assert len(open_table(root, PAIRS).file_uris()) == 1
    assert sorted(load_rows(root)["row_id"]) == rows
    assert partition_version(open_table(root, PAIRS), FEEDBACK_TOPIC, 0) == 7
    # Replaced files stay for the retention (readers of older versions).
    assert admin.vacuum(root) == {name: [] for name in TABLES}
    assert len(admin.vacuum(root, retention_hours=168 * 100, dry_run=True)[PAIRS]) == 0


def test_vacuum_refuses_a_retention_shorter_than_the_tables(migrated: tuple[OldStore, Path]) -> None:
    _, root = migrated
    with pytest.raises(AdminError, match="retention of 1 hours is below"):
        admin.vacuum(root, retention_hours=1)


def test_sizes(migrated: tuple[OldStore, Path], tmp_path: Path) -> None:
    old, root = migrated
    assert admin.sizes(root) == {COMPLETIONS: (1, 6), JUDGEMENTS: (1, len(old.judgements)),
                                 PAIRS: (1, len(old.rows))}
    assert admin.sizes(tmp_path / "none") == {name: (-1, 0) for name in TABLES}


def test_cleanup_metadata_keeps_young_logs(migrated: tuple[OldStore, Path]) -> None:
    _, root = migrated
    assert admin.cleanup_metadata(root) == {name: 0 for name in TABLES}


# --- the command line ---


def test_cli_migrate_versions_erase(old: OldStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runner = CliRunner()
    root = tmp_path / "new"
    result = runner.invoke(tuneloop_cli, ["store", "migrate", str(old.root), "--to", str(root)])
    assert result.exit_code == 0, result.output
    assert f"pairs: {len(old.rows)} rows" in result.output and "verified" in result.output

    monkeypatch.setenv("TUNELOOP_STORE_ROOT", str(root))  # the default root from StoreSettings
    result = runner.invoke(tuneloop_cli, ["store", "versions"])
    assert result.exit_code == 0, result.output
    assert f"judgements: version 1, {len(old.judgements)} rows" in result.output

    result = runner.invoke(tuneloop_cli, ["store", "erase", "--tenant", GLOBEX], input="n\n")
    assert result.exit_code != 0 and _counts(root, GLOBEX)["judgements"] == 2  # declined: nothing erased
    result = runner.invoke(tuneloop_cli, ["store", "erase", "--tenant", GLOBEX], input="y\n")
    assert result.exit_code == 0, result.output
    assert "judgements 2" in result.output and "erasures.jsonl" in result.output
    result = runner.invoke(tuneloop_cli, ["store", "erase", "--tenant", "acme", "--user", BOB, "--yes",
                                          "--root", str(root)])
    assert result.exit_code == 0, result.output
    assert len(read_erasures(root)) == 2

    result = runner.invoke(tuneloop_cli, ["store", "migrate", str(old.root), "--to", str(root)])
    assert result.exit_code == 1 and "already holds" in result.output


def test_cli_upkeep(migrated: tuple[OldStore, Path]) -> None:
    _, root = migrated
    runner = CliRunner()
    for args in (["compact"], ["vacuum"], ["vacuum", "--dry-run"], ["cleanup-metadata"]):
        result = runner.invoke(tuneloop_cli, ["store", *args, "--root", str(root)])
        assert result.exit_code == 0, (args, result.output)
        assert "pairs:" in result.output
    result = runner.invoke(tuneloop_cli, ["store", "vacuum", "--retention-hours", "1", "--root", str(root)])
    assert result.exit_code == 1 and "retention" in result.output
