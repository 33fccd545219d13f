"""Administration of the store's tables: erasure, compaction, vacuum, log cleanup, sizes.

Erasure (`erase`) deletes one tenant, or one end user / annotator of a tenant, and then
removes every file that still holds the deleted rows, so that nothing of them is left under
the table folders:

- the data files the delete replaced: a vacuum with retention 0 in delta-rs's "lite" mode,
  which deletes only files a commit removed, never a concurrent writer's file that is not
  committed yet (a "full" vacuum with retention 0 would, and lose that writer's rows);
- the change-data files the delete itself wrote (`_change_data/`, the tables keep a change
  data feed: tables.py), which hold the deleted rows as `delete` changes. Lite vacuum leaves
  them and full vacuum is unsafe (above); only deletes write change data in these tables,
  so every file there goes;
- the log: every commit before the erasure names its files with min/max statistics of
  their columns, and the delete's commit names its predicate, i.e. the tenant or user. A
  checkpoint is written after the erasure and every log file before it is deleted.

What a user erasure removes: the user's judgements (annotator_id == user in the tenant), the
pair rows made from them (the row's annotator is the user, or one of its source_event_ids
is an event of the user: rating pairs may combine two annotators' events). Completions
carry no user id and stay; a tenant erasure removes the tenant's completions too.

Lineage: a model card names its training rows as `pairs@<version>`. After an erasure every
version before it is unreadable (its files and log are gone), so each erasure is recorded in
`erasures.jsonl` beside the tables (folder roots; an object-store root keeps no such file,
the command prints the record instead): when, which tenant, the user as a sha256 (the log
must not itself keep the erased identifier), the rows deleted per table, and the table
versions before and after. A card naming `pairs@v` with v at or below an entry's
`versions_before.pairs` was trained on data of which that entry's part no longer exists.

Erasure covers what the tables hold when it commits. Feedback still in Kafka (until the
topics' retention) or arriving later is stored again: revoke the user's keys first. A
running store consumer may find that its change-feed position was erased and restart once
(it then resumes from the tables, dropping what it had cached of the erased rows).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
from deltalake import DeltaTable
from deltalake.exceptions import CommitFailedError, DeltaError
from deltalake.fs import DeltaStorageHandler

from tuneloop.store.migrate import LEGACY_INDEX, LEGACY_JUDGEMENTS, legacy_files
from tuneloop.store.tables import COMPLETIONS, JUDGEMENTS, PAIRS, TABLES, dataset, is_url, open_table

ERASURES_FILE = "erasures.jsonl"
LOG_DIR, CHANGE_DATA_DIR = "_delta_log", "_change_data"
# Deletes race the consumer's appends; a conflict is retried with a fresh look at the table.
_DELETE_ATTEMPTS = 5


class AdminError(RuntimeError):
    """An administration step that must not run on this root as it is."""


@dataclass
class Erasure:
    at: str
    tenant: str
    user: str | None
    deleted: dict[str, int] = field(default_factory=dict)
    files_removed: dict[str, int] = field(default_factory=dict)
    versions_before: dict[str, int] = field(default_factory=dict)
    versions_after: dict[str, int] = field(default_factory=dict)
    log: str | None = None  # the erasures.jsonl it was recorded in (None: object-store root)

    def record(self) -> dict:
        """The erasure log's line: the user only as a digest."""
        entry = asdict(self)
        entry.pop("log")
        entry["user_sha256"] = None if self.user is None else hashlib.sha256(self.user.encode()).hexdigest()
        entry.pop("user")
        return entry


def erase(root: str | Path, tenant: str, user: str | None = None) -> Erasure:
    """Delete the tenant's data, or one user's (annotator_id) within the tenant; remove the
    files that held it; record the erasure. Returns the rows deleted per table."""
    if not tenant:
        raise ValueError("tenant is required")
    if user == "":
        raise ValueError("user must not be empty (omit it to erase the whole tenant)")
    _refuse_legacy(root, "an erasure cannot remove data from its files", legacy_files(root))
    done = Erasure(at=datetime.now(UTC).isoformat(timespec="seconds"), tenant=tenant, user=user)
    tables = {name: t for name in TABLES if (t := open_table(root, name)) is not None}
    done.versions_before = {name: t.version() for name, t in tables.items()}
    # Training rows first: a failure half-way leaves no pair without its judgement erased.
    for name in (PAIRS, JUDGEMENTS, COMPLETIONS):
        table = tables.get(name)
        if table is None or (name == COMPLETIONS and user is not None):
            done.deleted[name] = 0
            continue
        predicate = _predicate(name, tenant, user, tables)
        done.deleted[name], committed = _delete(table, predicate)
        # Also after an erasure that stopped between its delete and its purge: its change data is left.
        if committed or _listing(_files(table), CHANGE_DATA_DIR):
            done.files_removed[name] = _purge(table)
    for table in tables.values():
        table.update_incremental()
    done.versions_after = {name: t.version() for name, t in tables.items()}
    done.log = _record(root, done)
    return done


def _sql(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _predicate(name: str, tenant: str, user: str | None, tables: dict[str, DeltaTable]) -> Callable[[], str]:
    """The delete's predicate, computed afresh for each attempt (the table may have grown)."""
    scope = f"tenant = {_sql(tenant)}"
    if user is None:
        return lambda: scope
    own = f"{scope} AND annotator_id = {_sql(user)}"
    if name != PAIRS:
        return lambda: own

    def pairs() -> str:
        # Pairs of another annotator that were made with one of the user's events.
        others = _rows_using(tables[PAIRS], tenant, user, _event_ids(tables, tenant, user))
        if not others:
            return own
        listed = ", ".join(_sql(r) for r in others)
        return f"{scope} AND (annotator_id = {_sql(user)} OR row_id IN ({listed}))"

    return pairs


def _scan(table: DeltaTable, columns: list[str], where: pc.Expression) -> pa.Table:
    """Rows matching `where`, filtered after the scan, not in it: files a delete rewrote
    carry string_view columns (delta-rs 1.6), on which pyarrow's scan filters fail."""
    return dataset(table).to_table(columns=columns).filter(where)


def _event_ids(tables: dict[str, DeltaTable], tenant: str, user: str) -> set[str]:
    mine = (pc.field("tenant") == tenant) & (pc.field("annotator_id") == user)
    out: set[str] = set()
    for name in (JUDGEMENTS, PAIRS):
        if name in tables:
            found = _scan(tables[name], ["event_id", "tenant", "annotator_id"], mine)
            out.update(found.column("event_id").to_pylist())
    return out


def _rows_using(table: DeltaTable, tenant: str, user: str, events: set[str]) -> list[str]:
    if not events:
        return []
    theirs = (pc.field("tenant") == tenant) & (pc.field("annotator_id") != user)
    rows = _scan(table, ["row_id", "source_event_ids", "tenant", "annotator_id"], theirs)
    sources = rows.column("source_event_ids").combine_chunks()
    hit = pc.is_in(pc.list_flatten(sources), value_set=pa.array(sorted(events), pa.string()))
    parents = pc.unique(pc.filter(pc.list_parent_indices(sources), hit))
    return sorted(pc.take(rows.column("row_id"), parents).to_pylist())


def _delete(table: DeltaTable, predicate: Callable[[], str]) -> tuple[int, bool]:
    """(rows deleted, whether a commit was made: delta-rs commits nothing when no row matched)."""
    for attempt in range(_DELETE_ATTEMPTS):
        table.update_incremental()
        before = table.version()
        try:
            metrics = table.delete(predicate())
        except CommitFailedError:
            if attempt == _DELETE_ATTEMPTS - 1:
                raise
            continue
        return int(metrics.get("num_deleted_rows", 0)), table.version() > before
    raise AssertionError("unreachable")


def _files(table: DeltaTable) -> pafs.FileSystem:
    """The table's folder through delta-rs's own storage (local, or S3 with its AWS_* settings)."""
    return pafs.PyFileSystem(DeltaStorageHandler(table.table_uri))


def _purge(table: DeltaTable) -> int:
    """Remove every file that may hold deleted rows; the number of files removed."""
    removed = len(table.vacuum(retention_hours=0, dry_run=False, enforce_retention_duration=False))
    files = _files(table)
    # Only deletes write change data here (the consumer appends, compaction adds none), so
    # every change-data file holds deleted rows: this erasure's, or an interrupted one's.
    for info in _listing(files, CHANGE_DATA_DIR):
        removed += _remove(files, info.path)
    table.update_incremental()
    table.create_checkpoint()
    return removed + _drop_log_before(files, table.version())


def _listing(files: pafs.FileSystem, folder: str) -> list[pafs.FileInfo]:
    selector = pafs.FileSelector(folder, allow_not_found=True, recursive=True)
    return [info for info in files.get_file_info(selector) if info.type == pafs.FileType.File]


def _remove(files: pafs.FileSystem, path: str) -> int:
    try:
        files.delete_file(path)
    except FileNotFoundError:
        return 0
    return 1


def _drop_log_before(files: pafs.FileSystem, checkpoint: int) -> int:
    """Delete the log files (commits, checkpoints) of versions before `checkpoint`.

    Not delta-rs's cleanup_metadata: that keeps everything younger than the table's
    delta.logRetentionDuration (30 days), and lowering the property for a moment is a
    metadata commit that makes concurrent appends fail.
    """
    removed = 0
    for info in files.get_file_info(pafs.FileSelector(LOG_DIR)):
        version = info.base_name[:20]
        if version.isdigit() and int(version) < checkpoint:
            removed += _remove(files, info.path)
    return removed


def _record(root: str | Path, done: Erasure) -> str | None:
    if is_url(root):
        return None
    path = Path(root) / ERASURES_FILE
    with open(path, "a") as out:
        out.write(json.dumps(done.record(), sort_keys=True) + "\n")
        out.flush()
        os.fsync(out.fileno())
    return str(path)


def read_erasures(root: str | Path) -> list[dict]:
    """The erasure log of a folder root, oldest first ([] when none)."""
    path = None if is_url(root) else Path(root) / ERASURES_FILE
    if path is None or not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _refuse_legacy(root: str | Path, why: str, found: list[str]) -> None:
    if not found:
        return
    shown = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
    raise AdminError(
        f"{root} still holds files of the old-format store ({shown}): {why}. Once the migration is "
        f"checked (`tuneloop store versions`), delete them: {LEGACY_INDEX}*, rows/, "
        f"{LEGACY_JUDGEMENTS}/[0-9]*.parquet"
    )


# --- upkeep ---


def _tables(root: str | Path) -> dict[str, DeltaTable]:
    return {name: t for name in TABLES if (t := open_table(root, name)) is not None}


def compact(root: str | Path) -> dict[str, dict]:
    """Merge each table's small files (one per consumer commit) into larger ones; delta-rs's
    metrics per table. Rows and versions of the app transactions are unchanged."""
    return {name: t.optimize.compact() for name, t in _tables(root).items()}


def vacuum(root: str | Path, retention_hours: int | None = None, dry_run: bool = False) -> dict[str, list[str]]:
    """Delete files no table version younger than the retention needs: files replaced by
    compaction or deletes, change-data files, and files of writers that crashed before their
    commit. None: the table's delta.deletedFileRetentionDuration (7 days); shorter is refused
    (readers of recent versions, and writers about to commit, still need those files)."""
    legacy = [f for f in legacy_files(root) if f.startswith(LEGACY_JUDGEMENTS + "/")]
    _refuse_legacy(root, "a full vacuum deletes every file the judgements table does not name", legacy)
    out = {}
    for name, table in _tables(root).items():
        try:
            out[name] = table.vacuum(
                retention_hours=retention_hours, dry_run=dry_run, enforce_retention_duration=True, full=True
            )
        except DeltaError as err:
            if "retention" not in str(err):
                raise
            raise AdminError(
                f"{name}: a retention of {retention_hours} hours is below the table's "
                f"delta.deletedFileRetentionDuration (delta-rs: {err})"
            ) from None
    return out


def cleanup_metadata(root: str | Path) -> dict[str, int]:
    """Delete log files older than each table's delta.logRetentionDuration (30 days) and
    its newest checkpoint; time travel ends there. The number of log files deleted."""
    out = {}
    for name, table in _tables(root).items():
        files = _files(table)
        count = len(files.get_file_info(pafs.FileSelector(LOG_DIR)))
        table.cleanup_metadata()
        out[name] = count - len(files.get_file_info(pafs.FileSelector(LOG_DIR)))
    return out


def sizes(root: str | Path) -> dict[str, tuple[int, int]]:
    """Each table's newest version and row count ((-1, 0) where a table does not exist)."""
    out = {}
    for name in TABLES:
        table = open_table(root, name)
        out[name] = (-1, 0) if table is None else (table.version(), dataset(table).count_rows())
    return out
