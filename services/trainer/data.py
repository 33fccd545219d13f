"""Training data for the stages, in TRL's conversational formats.

Every prompt becomes a list of chat messages and every response an assistant message, so
the chat template is applied in training exactly as the Generation service applies it
when serving.

Preferences come from the preference store (through `tuneloop.store.read`, the store's
read API) or, for tests and offline work, from a JSONL file or saved dataset with
prompt/chosen/rejected columns. Each load reports the snapshot it read: a version of the
store's pairs table and its Kafka offsets (store) or the file's hash (file), which is the
model's lineage.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneloop.common.durable import file_sha256
from tuneloop.trainer.config import ConfigError, PreferenceSource
from tuneloop.trainer.weighting import check_weights

if TYPE_CHECKING:
    import pandas as pd
    from datasets import Dataset

Messages = list[dict[str, str]]


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        raise ConfigError(f"data file {path} does not exist") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}:{number}: not JSON: {err}") from None
        if not isinstance(row, dict):
            raise ConfigError(f"{path}:{number}: expected a JSON object")
        rows.append(row)
    if not rows:
        raise ConfigError(f"data file {path} has no rows")
    return rows


def as_messages(prompt: Any, where: str) -> Messages:
    """A prompt given as text or as chat messages, as chat messages."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list | tuple) or hasattr(prompt, "tolist"):
        messages = list(prompt)
        if messages and all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in messages):
            return [{"role": str(m["role"]), "content": str(m["content"])} for m in messages]
    raise ConfigError(f"{where}: a prompt is a string or a non-empty list of {{role, content}} messages")


def as_reply(response: Any, where: str) -> Messages:
    if isinstance(response, str):
        return [{"role": "assistant", "content": response}]
    messages = as_messages(response, where)
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        raise ConfigError(f"{where}: a response is a string or one assistant message")
    return messages


def sft_dataset(path: Path) -> Dataset:
    """{'messages': [...]} rows -> prompt/completion rows (the loss falls on the completion)."""
    from datasets import Dataset

    out = []
    for i, row in enumerate(read_jsonl(path), 1):
        where = f"{path}: row {i}"
        messages = as_messages(row.get("messages"), where)
        if len(messages) < 2 or messages[-1]["role"] != "assistant":
            raise ConfigError(f"{where}: messages must end with the ideal assistant reply after a prompt")
        out.append({"prompt": messages[:-1], "completion": messages[-1:]})
    return Dataset.from_list(out)


def prompt_rows(path: Path) -> list[Messages]:
    """Prompts from JSONL rows holding 'prompt' (text or messages) or 'messages'."""
    prompts = []
    for i, row in enumerate(read_jsonl(path), 1):
        value = row.get("prompt", row.get("messages"))
        prompts.append(as_messages(value, f"{path}: row {i}"))
    return prompts


def prompt_dataset(prompts: list[Messages]) -> Dataset:
    from datasets import Dataset

    return Dataset.from_list([{"prompt": p} for p in prompts])


@dataclass
class PreferenceData:
    """Preference rows of one snapshot, before the trainer's tie/both-bad policies."""

    rows: pd.DataFrame
    source: str  # where they came from: a snapshot id or a file path
    offsets: dict[str, dict[int, int]] = field(default_factory=dict)  # topic -> partition -> offset
    sha256: str | None = None  # of a file source
    version: int | None = None  # of the store's pairs table
    store_root: str | None = None

    def lineage(self) -> dict[str, Any]:
        return {"source": self.source, "sha256": self.sha256, "version": self.version, "rows": len(self.rows)}


def source_sha256(path: Path) -> str:
    """A file's SHA-256; for a folder (a saved dataset), that of each file's name and digest."""
    if not path.is_dir():
        return file_sha256(path)
    lines = [f"{f.relative_to(path).as_posix()} {file_sha256(f)}\n" for f in sorted(path.rglob("*")) if f.is_file()]
    return hashlib.sha256("".join(lines).encode()).hexdigest()


# Preference files besides a saved dataset folder: JSON lines, and the tabular exports.
_TABLE_READERS = {".parquet": "read_parquet", ".csv": "read_csv"}


def load_preferences(source: PreferenceSource) -> PreferenceData:
    import pandas as pd

    if source.store_root is not None:
        from tuneloop.store import read

        try:
            if source.snapshot == "latest":
                snap = read.current_snapshot(source.store_root)
            else:
                snap = read.snapshot_at(source.store_root, read.parse_snapshot(source.snapshot))
        except (ValueError, OSError) as err:
            raise ConfigError(f"preferences.snapshot: {err}") from None
        rows = read.rows_for_training(read.load_rows(source.store_root, snap.version), source.tenants,
                                      source.max_tenant_share)
        return PreferenceData(
            rows=rows, source=snap.id, offsets=snap.offsets, version=snap.version, store_root=source.store_root
        )
    path = Path(source.path)  # type: ignore[arg-type]
    if path.is_dir():
        from datasets import load_from_disk

        rows = load_from_disk(str(path)).to_pandas()
    elif not path.is_file():
        raise ConfigError(f"preferences.path: {path} does not exist")
    elif path.suffix in _TABLE_READERS:
        rows = getattr(pd, _TABLE_READERS[path.suffix])(path)
    else:
        rows = pd.DataFrame(read_jsonl(path))
    missing = {"prompt", "chosen", "rejected"} - set(rows.columns)
    if missing:
        raise ConfigError(f"preferences.path: {path} lacks column(s) {sorted(missing)}")
    return PreferenceData(rows=rows, source=str(path), sha256=source_sha256(path))


def to_dpo_dataset(data: PreferenceData, honour_weight: bool = True) -> Dataset:
    """Preference pairs in TRL's format: strict preferences only (ties and both-bad name no
    better answer; `PreferenceSource.tie_policy`).

    Store rows go through the store's own exporter (chat prompts: conversational format;
    raw prompts: plain strings, as served). File rows are conversational: a string prompt is
    one user message, a string response one assistant message; a file row with a `label`
    other than "preference" is left out. With `honour_weight`, the rows' `weight` column (a
    file row without one weighs 1) comes along for the trainer to draw by (weighting.py).
    """
    from datasets import Dataset

    rows = data.rows
    if honour_weight and "weight" in rows.columns:
        rows = rows.assign(weight=rows["weight"].fillna(1.0).astype(float))
    if "row_id" in rows.columns and "prompt_raw" in rows.columns:
        from tuneloop.store.read import to_trl_dataset

        try:
            dataset = to_trl_dataset(rows, "drop", "drop")
        except ValueError as err:
            raise ConfigError(f"preferences: {err}") from None
        dataset = dataset.select_columns(["prompt", "chosen", "rejected"] + (["weight"] if honour_weight else []))
    else:
        records = rows.to_dict("records")
        if "label" in rows.columns:
            records = [r for r in records if r["label"] == "preference"]
        weighted = honour_weight and "weight" in rows.columns
        out = []
        for i, r in enumerate(records, 1):
            where = f"{data.source}: row {i}"
            out.append(
                {
                    "prompt": as_messages(r["prompt"], where),
                    "chosen": as_reply(r["chosen"], where),
                    "rejected": as_reply(r["rejected"], where),
                    **({"weight": r["weight"]} if weighted else {}),
                }
            )
        dataset = Dataset.from_list(out)
    if len(dataset) == 0:
        raise ConfigError(f"{data.source}: no preference pairs to train on")
    if "weight" in dataset.column_names:
        try:
            check_weights(dataset["weight"])
        except ValueError as err:
            raise ConfigError(f"{data.source}: {err}") from None
    return dataset


def unique_prompts(dataset: Dataset) -> list[Any]:
    """The distinct prompts of a preference dataset, first-seen order (online RL's prompt set)."""
    seen: dict[str, Any] = {}
    for prompt in dataset["prompt"]:
        seen.setdefault(json.dumps(prompt, sort_keys=True), prompt)
    return list(seen.values())
