"""The store's Delta Lake tables: their schemas, where they live, and how a commit lands.

Under the store root (a folder, or an object-storage URL such as `s3://bucket/prefix`):

    completions/   one row per completion record read from tuneloop.completions.v1
    judgements/    one row per stored feedback event (the raw judgement)
    pairs/         the training rows the pair rules made of the judgements

Each is a Delta table (delta-rs): its `_delta_log` is the only truth about which Parquet
files hold committed rows, so a reader in any process or pod sees whole commits only, and a
file no commit names is invisible to readers (and removed by `vacuum`, never at start).

Exactly once: every append carries one Delta application transaction per Kafka partition
it covers, app id `tuneloop.store/<topic>/<partition>`, version = the offset below which that
partition's records are all in this table (or dead-lettered, or duplicates). Every row keeps
the topic, partition and offset of the record it came from, so a writer that replays records
after a crash keeps only rows at or past the table's version for their partition. Two writers
committing the same partition at once (a consumer that lost its partitions but has not noticed
yet) conflict on the app id: Delta refuses the second commit.

A commit that fails for any other reason is written again by halves (`append_by_halves`),
down to one record's rows, so that one record no commit can take is isolated (the consumer
dead-letters it) and costs neither the records beside it nor the partition behind it. Each
part's commit moves a partition's version only up to its first record still to be written.

Object storage takes its settings and credentials from the environment (AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_ALLOW_HTTP, and for concurrent
writers AWS_CONDITIONAL_PUT=etag), read by delta-rs itself.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
from deltalake import CommitProperties, DeltaTable, Transaction, write_deltalake
from deltalake.exceptions import TableNotFoundError

COMPLETIONS, JUDGEMENTS, PAIRS = "completions", "judgements", "pairs"
Source = tuple[str, int, int]  # the topic, partition and offset of the record a row came from
TABLES = (COMPLETIONS, JUDGEMENTS, PAIRS)
APP_PREFIX = "tuneloop.store"

_MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
_TS = pa.timestamp("us", tz="UTC")
_SOURCE = [("topic", pa.string()), ("partition", pa.int32()), ("offset", pa.int64())]
# What a judgement says of itself; its pairs carry the same columns, so that training data
# can be filtered like the judgements (tenant, project, who, what kind).
_JUDGED = [
    ("item_id", pa.string()),
    ("tenant", pa.string()),
    ("project", pa.string()),
    ("source", pa.string()),
    ("annotator_id", pa.string()),
    ("kind", pa.string()),
]
_MARKED = [("calibration", pa.bool_()), ("anchor", pa.bool_()), ("created_at", _TS)]

COMPLETIONS_SCHEMA = pa.schema(
    [
        ("completion_id", pa.string()),
        ("request_id", pa.string()),
        ("conversation_id", pa.string()),
        ("tenant", pa.string()),
        ("prompt", pa.binary()),
        ("prompt_key", pa.string()),
        ("rendered_prompt", pa.string()),
        ("text", pa.string()),
        ("model", pa.string()),
        *_SOURCE,
        # Added later (ensure_tables adds them to older tables): null in rows written before,
        # and where the record did not say.
        ("finish_reason", pa.string()),  # "stop", "length" or "aborted", as the Generation service says
    ]
)

PAIRS_SCHEMA = pa.schema(
    [
        ("row_id", pa.string()),
        ("event_id", pa.string()),
        ("source_event_ids", pa.list_(pa.string())),
        *_JUDGED,
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
        *_MARKED,
        *_SOURCE,
        # Added later (ensure_tables adds them to older tables). Whether the answer ended at the
        # token limit (its completion's finish_reason "length"); null where the completion did
        # not say. A pair of cut answers may teach length rather than the preference.
        ("chosen_cut", pa.bool_()),
        ("rejected_cut", pa.bool_()),
    ]
)

JUDGEMENTS_SCHEMA = pa.schema(
    [
        ("event_id", pa.string()),
        *_JUDGED,
        ("choice", pa.string()),
        ("score", pa.float64()),
        ("completion_ids", pa.list_(pa.string())),
        ("criteria", pa.list_(pa.string())),
        ("marks", pa.string()),
        ("comment", pa.string()),
        *_MARKED,
        # A rating's place among earlier ratings of its prompt (pairs.py); null otherwise.
        ("request_id", pa.string()),
        ("prompt_key", pa.string()),
        ("value", pa.float64()),
        ("scale_min", pa.float64()),
        ("scale_max", pa.float64()),
        *_SOURCE,
    ]
)

SCHEMAS = {COMPLETIONS: COMPLETIONS_SCHEMA, JUDGEMENTS: JUDGEMENTS_SCHEMA, PAIRS: PAIRS_SCHEMA}
# Columns added after a table's first release: tables, versions and files from before lack them.
ADDED_COLUMNS = {COMPLETIONS: ("finish_reason",), JUDGEMENTS: (), PAIRS: ("chosen_cut", "rejected_cut")}


def is_url(root: str | Path) -> bool:
    return "://" in str(root)


def table_uri(root: str | Path, name: str) -> str:
    root = str(root)
    if is_url(root):
        return f"{root.rstrip('/')}/{name}"
    return str(Path(root).resolve() / name)


def app_id(topic: str, partition: int) -> str:
    return f"{APP_PREFIX}/{topic}/{partition}"


def parse_app_id(text: str) -> tuple[str, int] | None:
    prefix, _, rest = text.partition("/")
    topic, _, partition = rest.rpartition("/")
    if prefix != APP_PREFIX or not topic or not partition.isdigit():
        return None
    return topic, int(partition)


def open_table(root: str | Path, name: str, version: int | None = None) -> DeltaTable | None:
    """The table, at `version` (None: the newest); None when it was never created."""
    uri = table_uri(root, name)
    try:
        return DeltaTable(uri, version=version)
    except TableNotFoundError:
        return None


def ensure_tables(root: str | Path) -> dict[str, DeltaTable]:
    """Open the three tables, creating any that is missing (idempotent, safe to race)."""
    if not is_url(root):
        Path(root).mkdir(parents=True, exist_ok=True)
    out = {}
    for name in TABLES:
        table = open_table(root, name)
        if table is None:
            try:
                # The change data feed lets a writer read only what other writers appended
                # since it last looked (consumer.py); compaction adds nothing to it.
                DeltaTable.create(
                    table_uri(root, name),
                    SCHEMAS[name],
                    mode="ignore",
                    name=name,
                    configuration={"delta.enableChangeDataFeed": "true"},
                )
            except Exception:
                # Another writer created it first: fine, as long as it now exists.
                if open_table(root, name) is None:
                    raise
            table = open_table(root, name)
            assert table is not None
        out[name] = _add_missing_columns(root, name, table)
    return out


def _missing_columns(table: DeltaTable, name: str) -> list[pa.Field]:
    """The columns of the table's declared schema that `table` (its loaded version) lacks."""
    have = {f.name for f in table.schema().fields}
    return [f for f in SCHEMAS[name] if f.name not in have]


def _add_missing_columns(root: str | Path, name: str, table: DeltaTable, attempts: int = 5) -> DeltaTable:
    """Bring a table written before columns were added up to its declared schema.

    Columns are only ever added, at the end and nullable, so rows written before read as
    null there, and a reader of an older version sees the columns that version had (read.py
    fills in the rest). A writer still running older code cannot append after this: delta-rs
    refuses a batch with fewer columns than the table, the store treats that as the table's
    fault (tables.append_by_halves) and exits without dead-lettering anything, and the
    records are read again by a writer of the new schema.
    """
    from deltalake.schema import Field

    for attempt in range(attempts):
        missing = _missing_columns(table, name)
        if not missing:
            return table
        try:
            table.alter.add_columns(
                [Field.from_arrow(f) for f in missing],
                commit_properties=CommitProperties(custom_metadata={"writer": "tuneloop-store/schema"}),
            )
        except Exception:
            # Another writer evolved the table at the same moment: look again.
            if attempt == attempts - 1:
                raise
        reloaded = open_table(root, name)
        assert reloaded is not None
        table = reloaded
    return table


def append(
    table: DeltaTable, rows: pa.Table, versions: Mapping[tuple[str, int], int], commit_id: str | None = None
) -> None:
    """One Delta commit: `rows` plus the partitions' new versions, or nothing at all.

    Raises deltalake's CommitFailedError when another writer committed one of these
    partitions since `table` was read. `commit_id`, when given, is recorded in the commit's
    info so that `landed` can tell whether a commit that raised was written all the same.
    """
    metadata = {"writer": f"tuneloop-store/{os.uname().nodename}/{os.getpid()}"}
    if commit_id is not None:
        metadata["commit_id"] = commit_id
    write_deltalake(
        table,
        rows,
        mode="append",
        commit_properties=CommitProperties(
            app_transactions=[Transaction(app_id(t, p), int(v)) for (t, p), v in sorted(versions.items())],
            custom_metadata=metadata,
            # A conflict on one of our app ids is final; retries are for other writers' appends.
            max_commit_retries=20,
        ),
    )


def landed(table: DeltaTable, commit_id: str, since: int) -> bool:
    """Whether a commit recorded with `commit_id` is among the table's versions after `since`.

    A write can raise after its commit was written (a storage timeout on the reply, a failing
    post-commit step): writing its rows again would store them twice.
    """
    table.update_incremental()
    newer = table.version() - since
    if newer <= 0:
        return False
    return any(entry.get("commit_id") == commit_id for entry in table.history(newer))


class WriteFailed(Exception):
    """An append that was not committed, for a reason other than another writer's commit."""


# write(rows, versions, force): one commit, raising WriteFailed; force commits even with no
# rows and no version moved.
Write = Callable[[list[dict], Mapping[tuple[str, int], int], bool], None]


def source_of(row: Mapping) -> Source:
    return row["topic"], row["partition"], row["offset"]


def append_by_halves(
    write: Write,
    rows: Sequence[dict],
    versions: Mapping[tuple[str, int], int],
    give_up: Callable[[Source, WriteFailed], None],
) -> None:
    """Commit `rows` and `versions` in parts, after their single commit failed.

    Rows are grouped by their record and kept in record order. A part that fails is halved
    until it holds one record; that record is written once more after a commit of no rows
    proves that the table takes commits, and if it fails again it is handed to `give_up`
    (which must make it durable elsewhere before returning). A failing empty commit means
    the table, not a record, is at fault: its WriteFailed propagates and nothing is given up.

    Exactly once: every part carries each partition's version held back to the partition's
    first record not yet written (and never past its value in `versions`), so a version
    never passes a record that is neither in the table nor given up; the last commit
    carries `versions` themselves.
    """
    groups = _by_source(rows)
    if groups:
        _write_halves(write, groups, 0, len(groups), versions, give_up)
    write([], versions, False)  # the versions past the last records (no-op when a part carried them)


def _by_source(rows: Sequence[dict]) -> list[tuple[Source, list[dict]]]:
    groups: dict[Source, list[dict]] = {}
    for row in rows:
        groups.setdefault(source_of(row), []).append(row)
    return sorted(groups.items(), key=lambda group: group[0])


def _versions_before(
    groups: list[tuple[Source, list[dict]]], first_unwritten: int, versions: Mapping[tuple[str, int], int]
) -> dict[tuple[str, int], int]:
    """`versions`, each held back to its partition's first record from `first_unwritten` on."""
    out = dict(versions)
    for (topic, partition, offset), _ in groups[first_unwritten:]:
        if (topic, partition) in out:
            out[topic, partition] = min(out[topic, partition], offset)
    return out


def _write_halves(
    write: Write,
    groups: list[tuple[Source, list[dict]]],
    low: int,
    high: int,
    versions: Mapping[tuple[str, int], int],
    give_up: Callable[[Source, WriteFailed], None],
) -> None:
    if high - low == 1:
        _isolate(write, groups, low, versions, give_up)
        return
    middle = (low + high) // 2
    for start, end in ((low, middle), (middle, high)):
        part = [row for _, rows in groups[start:end] for row in rows]
        try:
            write(part, _versions_before(groups, end, versions), False)
        except WriteFailed:
            _write_halves(write, groups, start, end, versions, give_up)


def _isolate(
    write: Write,
    groups: list[tuple[Source, list[dict]]],
    index: int,
    versions: Mapping[tuple[str, int], int],
    give_up: Callable[[Source, WriteFailed], None],
) -> None:
    """One record's rows failed: blame the record only if the table takes other commits."""
    write([], _versions_before(groups, index, versions), True)
    source, rows = groups[index]
    try:
        write(rows, _versions_before(groups, index + 1, versions), False)
    except WriteFailed as err:
        give_up(source, err)


def partition_version(table: DeltaTable, topic: str, partition: int) -> int | None:
    return table.transaction_version(app_id(topic, partition))


def dataset(table: DeltaTable) -> ds.Dataset:
    """The Arrow dataset of `table`'s loaded version, its files read through pyarrow's own
    filesystem (local, or S3 with the same AWS_* settings delta-rs reads).

    Not delta-rs's default, a Python filesystem over its object store: a process that read
    through it aborts at exit now and then ("terminate called without an active exception",
    deltalake 1.6 with pyarrow 26; most single reads in a bare interpreter), and a trainer
    Job that exits so counts as failed. A scheme pyarrow has no filesystem for keeps the default.
    """
    files = _filesystem(table.table_uri)
    return table.to_pyarrow_dataset() if files is None else table.to_pyarrow_dataset(filesystem=files)


@functools.lru_cache(maxsize=64)
def _filesystem(uri: str) -> pafs.FileSystem | None:
    """pyarrow's filesystem rooted at `uri` (None: no such scheme in pyarrow), built once per
    table: the store scans its tables every step, and an S3 client is not free to make."""
    try:
        files, path = pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None
    return pafs.SubTreeFileSystem(path, files)


def scan(table: DeltaTable, columns: list[str] | None = None, where: pc.Expression | None = None) -> pa.Table:
    """Rows of `table` (its loaded version), with Parquet statistics skipping files where they can.

    Files a Delta delete rewrote hold string_view columns that pyarrow's filter kernels do
    not take: then read the columns as strings and filter after.
    """
    files = dataset(table)
    try:
        return files.to_table(columns=columns, filter=where)
    except pa.ArrowNotImplementedError:
        if where is None:
            raise
        data = files.to_table(columns=columns)
        plain = pa.schema([f.with_type(pa.string()) if f.type == pa.string_view() else f for f in data.schema])
        return data.cast(plain).filter(where)
