"""Training data for the stages, in TRL's conversational formats.

Every prompt becomes a list of chat messages and every response an assistant message, so
the chat template is applied in training exactly as the Generation service applies it
when serving.

Preferences come from the preference store (through `tuneloop.store.read`, the store's
read API) or, for tests and offline work, from a JSONL file or saved dataset with
prompt/chosen/rejected columns. Each load reports the snapshot it read: a version of the
store's pairs table and its Kafka offsets (store) or the file's hash (file), which is the
model's lineage.

Policy training does not use every row it read: `training_rows` leaves out ties and both-bad
pairs, pairs with an answer cut at the token limit (PreferenceSource.cut_answers; the store's
chosen_cut/rejected_cut) and pairs beyond max_pairs_per_prompt, and summarises what it kept
and why (the run report's "Training data"), with the length difference between chosen and
rejected answers: a difference leaning one way is the first sign of length hacking.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from tuneloop.common.durable import file_sha256
from tuneloop.trainer.config import ConfigError, PreferenceSource
from tuneloop.trainer.weighting import check_weights

if TYPE_CHECKING:
    import pandas as pd
    from datasets import Dataset

Messages = list[dict[str, str]]
CutAnswers = Literal["drop", "keep", "drop_if_chosen_cut"]
# Outside this band of "chosen is the longer answer" the data teaches length one way.
LENGTH_SKEW = (0.3, 0.7)
# Why a row of the snapshot is not trained on, in the order the reasons apply.
DROP_REASONS = ("other_tenants", "superseded", "tenant_share", "tie", "both_bad", "other_label", "cut", "balance")


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
    # PreferenceSource's rules for policy training (applied by to_dpo_dataset)
    cut_answers: CutAnswers = "drop"
    max_pairs_per_prompt: int | None = None
    # Rows of the snapshot before any was left out, and how many load_preferences left out why.
    snapshot_rows: int | None = None
    dropped: dict[str, int] = field(default_factory=dict)
    # What to_dpo_dataset trained on and left out (training_summary); None before it ran.
    summary: dict[str, Any] | None = None

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
        every = read.load_rows(source.store_root, snap.version)
        dropped: dict[str, int] = {}
        rows = read.rows_for_training(every, source.tenants, source.max_tenant_share, dropped)
        return PreferenceData(
            rows=rows, source=snap.id, offsets=snap.offsets, version=snap.version, store_root=source.store_root,
            cut_answers=source.cut_answers, max_pairs_per_prompt=source.max_pairs_per_prompt,
            snapshot_rows=len(every), dropped=dropped,
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
    return PreferenceData(
        rows=rows, source=str(path), sha256=source_sha256(path), cut_answers=source.cut_answers,
        max_pairs_per_prompt=source.max_pairs_per_prompt,
    )


def _flag(value: Any) -> bool | None:
    """A cut column's value: True, False, or None where the row does not say."""
    import pandas as pd

    if isinstance(value, str):  # CSV files spell them out
        return {"true": True, "1": True, "false": False, "0": False}.get(value.strip().lower())
    try:
        if pd.isna(value):
            return None
    except (TypeError, ValueError):
        return None
    return bool(value)


def _prompt_key(row: dict[str, Any], where: str) -> str:
    """One text per prompt: equal prompts, as chat messages or raw text, give equal keys."""
    prompt, raw = row.get("prompt"), row.get("prompt_raw")
    if isinstance(raw, str) and not isinstance(prompt, str) and (prompt is None or len(prompt) == 0):
        return json.dumps(["raw", raw])
    return json.dumps(as_messages(prompt, where), sort_keys=True)


def _answer_text(answer: Any, where: str) -> str:
    return answer if isinstance(answer, str) else "".join(m["content"] for m in as_reply(answer, where))


def _draw(seed: int, identity: str) -> str:
    # A hash, not a shuffle: a pair that stays keeps its place when later pairs join the snapshot.
    return hashlib.sha256(f"{seed}\0{identity}".encode()).hexdigest()


def training_rows(data: PreferenceData, seed: int = 0) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The rows policy training uses, and a summary of them (the run report's "Training data").

    Of `data.rows`, in this order: strict preferences only (ties and both-bad name no better
    answer; a file row without a label counts as a preference), then `data.cut_answers`
    (PreferenceSource.cut_answers; a row that does not say whether its answers were cut is
    kept), then at most `data.max_pairs_per_prompt` rows of one prompt, those drawn with
    `seed`. Rows keep their order.
    """
    rows = data.rows.reset_index(drop=True)
    dropped = dict.fromkeys(DROP_REASONS, 0)
    for reason, count in data.dropped.items():
        dropped[reason] = dropped.get(reason, 0) + count
    if "label" in rows.columns:
        labels = rows["label"]
        dropped["tie"] += int((labels == "tie").sum())
        dropped["both_bad"] += int((labels == "both_bad").sum())
        dropped["other_label"] += int((~labels.isin(["preference", "tie", "both_bad"])).sum())
        rows = rows[labels == "preference"]
    records = rows.to_dict("records")
    where = [f"{data.source}: row {i + 1}" for i in rows.index]
    cuts = [(_flag(r.get("chosen_cut")), _flag(r.get("rejected_cut"))) for r in records]
    if data.cut_answers == "keep":
        keep = [True] * len(records)
    elif data.cut_answers == "drop_if_chosen_cut":
        keep = [chosen is not True for chosen, _ in cuts]
    else:
        keep = [chosen is not True and rejected is not True for chosen, rejected in cuts]
    dropped["cut"] += keep.count(False)
    kept = [i for i, k in enumerate(keep) if k]
    keys = {i: _prompt_key(records[i], where[i]) for i in kept}
    limit = data.max_pairs_per_prompt
    if limit is not None:
        by_prompt: dict[str, list[int]] = {}
        for i in kept:
            by_prompt.setdefault(keys[i], []).append(i)
        # A store row is known by its id, a file row by its place in the file.
        ids = list(rows["row_id"].astype(str)) if "row_id" in rows.columns else [str(i) for i in rows.index]
        chosen = {
            i for members in by_prompt.values() for i in sorted(members, key=lambda i: _draw(seed, ids[i]))[:limit]
        }
        dropped["balance"] += len(kept) - len(chosen)
        kept = [i for i in kept if i in chosen]
    out = rows.iloc[kept]
    per_prompt: dict[str, int] = {}
    for i in kept:
        per_prompt[keys[i]] = per_prompt.get(keys[i], 0) + 1
    differences = [
        len(_answer_text(records[i]["chosen"], where[i])) - len(_answer_text(records[i]["rejected"], where[i]))
        for i in kept
    ]
    summary = {
        "snapshot_pairs": data.snapshot_rows if data.snapshot_rows is not None else len(data.rows),
        "trained_pairs": len(kept),
        "dropped": dropped,
        "cut_answers": data.cut_answers,
        "max_pairs_per_prompt": limit,
        "seed": seed,
        "prompts": len(per_prompt),
        "most_pairs_of_a_prompt": max(per_prompt.values(), default=0),
        "cut_in_trained": {
            "chosen": sum(cuts[i][0] is True for i in kept),
            "rejected": sum(cuts[i][1] is True for i in kept),
            "unknown": sum(None in cuts[i] for i in kept),
        },
        "length_difference": length_difference(differences),
    }
    return out, summary


def length_difference(differences: list[int]) -> dict[str, Any]:
    """The distribution of len(chosen) - len(rejected), in characters, and whether it leans
    one way: the first sign of length hacking is data where the longer answer (or the shorter)
    nearly always wins."""
    import pandas as pd

    out: dict[str, Any] = {"unit": "characters", "pairs": len(differences)}
    if not differences:
        return {**out, "mean": None, "median": None, "q1": None, "q3": None, "chosen_longer_share": None,
                "skew": None}
    values = pd.Series(differences, dtype=float)
    q1, median, q3 = (float(v) for v in values.quantile([0.25, 0.5, 0.75]))
    share = sum(d > 0 for d in differences) / len(differences)
    low, high = LENGTH_SKEW
    skew = None
    if share > high:
        skew = (f"the chosen answer is the longer one in {share:.0%} of pairs (above {high:.0%}): training on them "
                "may teach that longer wins (length hacking)")
    elif share < low:
        skew = (f"the chosen answer is the longer one in only {share:.0%} of pairs (below {low:.0%}): training on "
                "them may teach that shorter wins")
    mean = float(values.mean())
    return {**out, "mean": mean if math.isfinite(mean) else None, "median": median, "q1": q1, "q3": q3,
            "chosen_longer_share": share, "skew": skew}


class NoTrainingPairs(ConfigError):
    """Every pair of the snapshot was left out by the declared rules: a standalone stage has
    nothing to do (an error), a retrain is refused (the data, not the config, said no)."""


def to_dpo_dataset(data: PreferenceData, honour_weight: bool = True, seed: int = 0) -> Dataset:
    """Preference pairs in TRL's format, of the rows `training_rows` keeps: strict preferences
    only (ties and both-bad name no better answer; `PreferenceSource.tie_policy`), cut answers
    as `PreferenceSource.cut_answers` says, at most `max_pairs_per_prompt` per prompt (drawn
    with `seed`). What was kept and left out is recorded in `data.summary`.

    Store rows go through the store's own exporter (chat prompts: conversational format;
    raw prompts: plain strings, as served). File rows are conversational: a string prompt is
    one user message, a string response one assistant message. With `honour_weight`, the
    rows' `weight` column (a file row without one weighs 1) comes along for the trainer to
    draw by (weighting.py).
    """
    from datasets import Dataset

    rows, data.summary = training_rows(data, seed)
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
        weighted = honour_weight and "weight" in rows.columns
        out = []
        for i, r in zip(rows.index, rows.to_dict("records"), strict=True):
            where = f"{data.source}: row {i + 1}"
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
        left_out = ", ".join(f"{reason} {n}" for reason, n in data.summary["dropped"].items() if n)
        raise NoTrainingPairs(
            f"{data.source}: no preference pairs to train on" + (f" (left out: {left_out})" if left_out else "")
        )
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
