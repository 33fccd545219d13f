"""The store's read API: snapshots, training rows, judgements, completions.

The trainer, the reports, the workbench and GetAgreement read the store through this module
only, from any process or pod, while the store writes: a read is of one table version, which
never changes (until an erasure's vacuum removes its files).

A snapshot is a version of the pairs table; its id, `pairs@<version>`, is what a model card's
lineage names, and `load_rows(root, version)` reads exactly those rows again (time travel).
Its Kafka offsets (`Snapshot.offsets`) are, per feedback-topic partition, the offset below
which every record was final when that version was committed.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from tuneloop.store.pairs import BOTH_BAD, PREFERENCE, TIE
from tuneloop.store.tables import (
    COMPLETIONS,
    JUDGEMENTS,
    JUDGEMENTS_SCHEMA,
    PAIRS,
    PAIRS_SCHEMA,
    SCHEMAS,
    app_id,
    dataset,
    is_url,
    open_table,
    scan,
)

if TYPE_CHECKING:
    from datasets import Dataset

ANCHORS_FILE = "anchors.json"
_SNAPSHOT_ID = re.compile(r"^pairs@(?P<version>\d+)$")
# A snapshot's offsets are found by probing partitions 0, 1, ...; a topic's partitions are
# numbered densely, so this many misses in a row means there are no more.
_PROBE_MISSES = 32

Policy = Literal["drop", "keep"]
# Files come back in no fixed order; records have one.
_RECORD_ORDER = [("topic", "ascending"), ("partition", "ascending"), ("offset", "ascending")]


@dataclass(frozen=True)
class Snapshot:
    """A version of the pairs table (-1: the store holds no table yet)."""

    version: int
    offsets: dict[str, dict[int, int]] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return snapshot_id(self.version)


def snapshot_id(version: int) -> str:
    return f"pairs@{version}"


def parse_snapshot(text: str) -> int:
    """The pairs-table version a snapshot id names."""
    match = _SNAPSHOT_ID.match(text.strip())
    if match is None:
        raise ValueError(f"not a snapshot id (pairs@<version>): {text!r}")
    return int(match["version"])


def _read(root: str | Path, name: str, version: int | None, filter: pc.Expression | None = None) -> pa.Table:
    table = None if version is not None and version < 0 else open_table(root, name, version)
    if table is None:
        if version is not None and version >= 0:
            raise ValueError(f"store at {root} has no {name} table (asked for version {version})")
        return SCHEMAS[name].empty_table()
    return _with_added_columns(scan(table, where=filter), name)


def _with_added_columns(data: pa.Table, name: str) -> pa.Table:
    """A version from before columns were added (tables.ADDED_COLUMNS), with them as nulls:
    every version reads with the same columns."""
    for column in SCHEMAS[name]:
        if column.name not in data.schema.names:
            data = data.append_column(column, pa.nulls(len(data), column.type))
    return data


def current_snapshot(root: str | Path, topics: Iterable[str] = ()) -> Snapshot:
    """The newest snapshot, with the offsets of `topics` (default: those its rows name)."""
    table = open_table(root, PAIRS)
    if table is None:
        return Snapshot(-1)
    return snapshot_at(root, table.version(), topics)


def snapshot_at(root: str | Path, version: int, topics: Iterable[str] = ()) -> Snapshot:
    table = open_table(root, PAIRS, version)
    if table is None:
        raise ValueError(f"store at {root} has no pairs table")
    names = list(topics) or sorted(
        set(dataset(table).to_table(columns=["topic"]).column("topic").unique().to_pylist())
    )
    offsets: dict[str, dict[int, int]] = {}
    for topic in names:
        found, partition, misses = {}, 0, 0
        while misses < _PROBE_MISSES:
            done = table.transaction_version(app_id(topic, partition))
            if done is None:
                misses += 1
            else:
                found[partition], misses = int(done), 0
            partition += 1
        offsets[topic] = found
    return Snapshot(version, offsets)


def load_rows(root: str | Path, version: int | None = None) -> pd.DataFrame:
    """The training rows of one pairs-table version (None: the newest), in the order of the
    records they came from: the same rows in the same order at every read of a version."""
    return _read(root, PAIRS, version).sort_by(_RECORD_ORDER + [("row_id", "ascending")]).to_pandas()


def latest_judgement_rows(rows: pd.DataFrame) -> pd.DataFrame:
    """Only the rows of each (tenant, annotator, item)'s latest judgement: a judge who
    answers the same item again replaces their answer, and repeating it adds no weight.
    Latest is by judgement time, then record order; rows keep their order."""
    if rows.empty:
        return rows
    events = rows.drop_duplicates("event_id")[["event_id", "tenant", "annotator_id", "item_id", "created_at",
                                               "partition", "offset"]]
    latest = events.sort_values(["created_at", "partition", "offset"], kind="stable").drop_duplicates(
        ["tenant", "annotator_id", "item_id"], keep="last")
    return rows[rows["event_id"].isin(set(latest["event_id"]))].reset_index(drop=True)


def cap_tenant_share(rows: pd.DataFrame, share: float) -> pd.DataFrame:
    """At most `share` of the rows from any one tenant (with two tenants or more): each tenant
    keeps its latest rows up to the highest level L with min(n_t, L) <= share * sum_t min(n_t, L).
    Rows keep their order."""
    counts = rows["tenant"].value_counts()
    if len(counts) < 2:
        return rows
    level = 0
    low, high = 0, int(counts.max())
    while low <= high:  # the kept total grows with L no faster than L itself: bisect
        mid = (low + high) // 2
        if mid <= share * sum(min(int(n), mid) for n in counts):
            level, low = mid, mid + 1
        else:
            high = mid - 1
    keep = rows.groupby("tenant", sort=False).cumcount(ascending=False) < level
    return rows[keep].reset_index(drop=True)


def rows_for_training(
    rows: pd.DataFrame,
    tenants: Iterable[str],
    max_tenant_share: float | None,
    dropped: dict[str, int] | None = None,
) -> pd.DataFrame:
    """What a training run may use of a snapshot: only the named tenants' rows, each judge's
    latest answer per item, no tenant above `max_tenant_share` (None: no cap).

    `dropped`, when given, gains the rows each step left out: `other_tenants`, `superseded`
    (an earlier answer of the same judge to the same item) and `tenant_share`."""
    counts = dropped if dropped is not None else {}
    named = rows[rows["tenant"].isin(list(tenants))]
    latest = latest_judgement_rows(named)
    capped = latest if max_tenant_share is None else cap_tenant_share(latest, max_tenant_share)
    for reason, before, after in (("other_tenants", rows, named), ("superseded", named, latest),
                                  ("tenant_share", latest, capped)):
        counts[reason] = counts.get(reason, 0) + len(before) - len(after)
    return capped


def load_row_ids(root: str | Path, version: int) -> set[str]:
    table = open_table(root, PAIRS, version)
    if table is None:
        return set()
    return set(dataset(table).to_table(columns=["row_id"]).column("row_id").to_pylist())


def load_judgements(root: str | Path, version: int | None = None) -> pd.DataFrame:
    """Every stored judgement (one row per accepted feedback event), in record order."""
    return _read(root, JUDGEMENTS, version).sort_by(_RECORD_ORDER).to_pandas()


def load_completions(root: str | Path, ids: Iterable[str] | None = None) -> pd.DataFrame:
    wanted = None if ids is None else pc.field("completion_id").isin(list(ids))
    return _read(root, COMPLETIONS, None, wanted).to_pandas()


def versions(root: str | Path) -> dict[str, int]:
    """Each table's newest version (-1 where a table does not exist yet)."""
    out = {}
    for name in SCHEMAS:
        table = open_table(root, name)
        out[name] = -1 if table is None else table.version()
    return out


def history(root: str | Path, name: str = PAIRS, limit: int | None = None) -> list[dict]:
    """The table's commits, newest first (delta-rs's history: version, timestamp, operation, ...)."""
    table = open_table(root, name)
    return [] if table is None else table.history(limit)


def anchors_text(root: str | Path) -> str | None:
    """The optional anchors.json of a folder store (object stores keep none)."""
    if is_url(root):
        return None
    path = Path(root) / ANCHORS_FILE
    return path.read_text() if path.is_file() else None


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


__all__ = [
    "JUDGEMENTS_SCHEMA",
    "PAIRS_SCHEMA",
    "Snapshot",
    "anchors_text",
    "current_snapshot",
    "history",
    "load_completions",
    "load_judgements",
    "load_row_ids",
    "load_rows",
    "parse_snapshot",
    "snapshot_at",
    "snapshot_id",
    "to_trl_dataset",
    "versions",
]
