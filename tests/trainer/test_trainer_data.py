"""The pairs policy training uses: the rule for answers cut at the token limit, at most so many
pairs of one prompt (seeded), and the summary the run report prints as "Training data"."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

from tuneloop.common.registry import Registry
from tuneloop.common.tiny_models import make_tiny
from tuneloop.trainer import report
from tuneloop.trainer.config import ConfigError, PreferenceSource, load_config
from tuneloop.trainer.data import PreferenceData, load_preferences, to_dpo_dataset, training_rows
from tuneloop.trainer.retrain import RetrainConfig, run_retrain


def pair(prompt: str, chosen: str, rejected: str, label: str = "preference", cut: tuple | None = (False, False)) -> dict:
    row = {"prompt": prompt, "chosen": chosen, "rejected": rejected, "label": label}
    if cut is not None:  # None: the row does not say (no columns)
        row["chosen_cut"], row["rejected_cut"] = cut
    return row


# Eight rows of three prompts; `cut` is (chosen_cut, rejected_cut).
KNOWN = [
    pair("P1", "aaaa", "bb"),                                    # 0: +2
    pair("P1", "aaaaaa", "b", cut=(True, False)),                # 1: +5, chosen cut
    pair("P1", "a", "bbb", cut=(False, True)),                   # 2: -2, rejected cut
    pair("P2", "aaaaa", "bbbbbbbbbb", cut=(True, True)),         # 3: -5, both cut
    pair("P2", "aa", "b", label="tie"),                          # 4
    pair("P3", "aaa", "bbbbbbb", cut=None),                      # 5: -4, does not say
    pair("P3", "aaaaaaaaaaa", "b", label="both_bad"),            # 6
    pair("P3", "aaaaaaaaaa", "bb"),                              # 7: +8
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def chosen_of(dataset: Any) -> list[str]:
    return [c[0]["content"] for c in dataset["chosen"]]


@pytest.mark.parametrize(
    ("rule", "kept"),
    [
        ("drop", [0, 5, 7]),
        ("drop_if_chosen_cut", [0, 2, 5, 7]),
        ("keep", [0, 1, 2, 3, 5, 7]),
    ],
)
def test_each_cut_rule_keeps_exactly_its_pairs(tmp_path: Path, rule: str, kept: list[int]) -> None:
    path = write_jsonl(tmp_path / "prefs.jsonl", KNOWN)
    data = load_preferences(PreferenceSource(path=path, cut_answers=rule))  # type: ignore[arg-type]
    assert chosen_of(to_dpo_dataset(data)) == [KNOWN[i]["chosen"] for i in kept]
    assert data.summary is not None
    assert data.summary["trained_pairs"] == len(kept)
    assert data.summary["dropped"]["cut"] == 6 - len(kept)


def test_the_default_rule_drops_a_pair_with_any_cut_answer() -> None:
    assert PreferenceSource(path=Path("x.jsonl")).cut_answers == "drop"


def test_files_without_the_cut_columns_are_read_and_kept(tmp_path: Path) -> None:
    rows = [pair(f"Q{i}", "long answer", "short", cut=None) for i in range(3)]
    for path in (write_jsonl(tmp_path / "p.jsonl", rows), tmp_path / "p.parquet", tmp_path / "p.csv"):
        if path.suffix == ".parquet":
            pd.DataFrame(rows).to_parquet(path)
        elif path.suffix == ".csv":
            pd.DataFrame(rows).to_csv(path, index=False)
        data = load_preferences(PreferenceSource(path=path))
        assert len(to_dpo_dataset(data)) == 3
        assert data.summary["cut_in_trained"]["unknown"] == 3  # type: ignore[index]


def test_a_csv_spells_the_cut_columns_out(tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    path.write_text("prompt,chosen,rejected,chosen_cut,rejected_cut\nA,x,y,True,False\nB,x,y,False,\nC,x,y,,True\n")
    assert len(to_dpo_dataset(load_preferences(PreferenceSource(path=path)))) == 1
    assert len(to_dpo_dataset(load_preferences(PreferenceSource(path=path, cut_answers="drop_if_chosen_cut")))) == 2


def test_nothing_left_says_why(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [pair("A", "x", "y", cut=(True, False))])
    with pytest.raises(ConfigError, match="no preference pairs to train on .left out: cut 1"):
        to_dpo_dataset(load_preferences(PreferenceSource(path=path)))


# --- at most so many pairs of one prompt ---


def many(counts: dict[str, int]) -> pd.DataFrame:
    """`counts[prompt]` pairs of each prompt, known by row id, the prompts interleaved."""
    rows = []
    for n in range(max(counts.values())):
        for prompt, count in counts.items():
            if n < count:
                rows.append({"row_id": f"{prompt}#{n}", **pair(prompt, f"{prompt} good {n}", f"{prompt} bad {n}")})
    return pd.DataFrame(rows)


def kept_ids(rows: pd.DataFrame, limit: int | None, seed: int) -> list[str]:
    data = PreferenceData(rows=rows, source="test", max_pairs_per_prompt=limit)
    return list(training_rows(data, seed)[0]["row_id"])


def test_max_pairs_per_prompt_caps_each_prompt_with_a_seeded_draw() -> None:
    rows = many({"busy": 10, "some": 3, "one": 1})
    kept = kept_ids(rows, 2, seed=0)
    per_prompt = pd.Series([i.split("#")[0] for i in kept]).value_counts().to_dict()
    assert per_prompt == {"busy": 2, "some": 2, "one": 1}
    assert kept == [i for i in rows["row_id"] if i in kept]  # rows keep their order
    assert kept_ids(rows, 2, seed=0) == kept  # the same seed draws the same pairs
    draws = {tuple(kept_ids(rows, 2, seed=seed)) for seed in range(8)}
    assert len(draws) > 1  # another seed draws others
    assert kept_ids(rows, None, seed=0) == list(rows["row_id"])

    # A pair that stays keeps its place when pairs of other prompts join the snapshot.
    grown = pd.concat([rows, many({"new": 5})], ignore_index=True)
    assert [i for i in kept_ids(grown, 2, seed=0) if not i.startswith("new")] == kept

    data = PreferenceData(rows=rows, source="test", max_pairs_per_prompt=2)
    assert len(to_dpo_dataset(data, seed=5)) == 5
    assert data.summary["dropped"]["balance"] == 9 and data.summary["seed"] == 5  # type: ignore[index]
    assert data.summary["most_pairs_of_a_prompt"] == 2  # type: ignore[index]


def test_the_cap_applies_after_cut_pairs_are_left_out() -> None:
    rows = many({"busy": 4})
    rows.loc[rows["row_id"].isin(["busy#0", "busy#1", "busy#2"]), "chosen_cut"] = True
    assert kept_ids(rows, 2, seed=0) == ["busy#3"]


# --- the summary and the report ---


def test_the_summary_of_a_known_dataset(tmp_path: Path) -> None:
    data = load_preferences(PreferenceSource(path=write_jsonl(tmp_path / "p.jsonl", KNOWN)))
    to_dpo_dataset(data)
    summary = data.summary
    assert summary is not None
    assert (summary["snapshot_pairs"], summary["trained_pairs"], summary["prompts"]) == (8, 3, 2)
    assert {k: v for k, v in summary["dropped"].items() if v} == {"tie": 1, "both_bad": 1, "cut": 3}
    assert summary["snapshot_pairs"] == summary["trained_pairs"] + sum(summary["dropped"].values())
    assert summary["cut_in_trained"] == {"chosen": 0, "rejected": 0, "unknown": 1}
    assert summary["length_difference"] == {
        "unit": "characters", "pairs": 3, "mean": 2.0, "median": 2.0, "q1": -1.0, "q3": 5.0,
        "chosen_longer_share": pytest.approx(2 / 3), "skew": None,
    }

    md = report.markdown({"run_id": "r", "status": "refused", "training_data": summary})
    section = md.split("## Training data", 1)[1].split("\n## ", 1)[0]
    assert "| in the snapshot | 8 |" in section
    assert "| left out: ties | 1 |" in section and "| left out: both bad | 1 |" in section
    assert "| left out: an answer cut at the token limit (cut_answers: drop) | 3 |" in section
    assert "| **trained on** | **3** |" in section
    assert "Prompts: 2, at most 2 pairs of one." in section
    assert "in characters: mean 2, median 2, quartiles -1 and 5" in section
    assert "longer one in 67% of pairs" in section
    assert "Length skew" not in section


@pytest.mark.parametrize(("longer", "words"), [(9, "above 70%"), (1, "below 30%")])
def test_a_length_difference_skewed_one_way_is_called_out(longer: int, words: str) -> None:
    rows = [pair(f"Q{i}", "x" * 20 if i < longer else "x", "x" * 10) for i in range(10)]
    data = PreferenceData(rows=pd.DataFrame(rows), source="test")
    to_dpo_dataset(data)
    skew = data.summary["length_difference"]["skew"]  # type: ignore[index]
    assert words in skew
    md = report.markdown({"run_id": "r", "status": "refused", "training_data": data.summary})
    (line,) = [line for line in md.splitlines() if line.startswith("**Length skew:**")]
    assert words in line and ("longer wins" if longer > 5 else "shorter wins") in line


def test_store_rows_read_before_the_columns_existed_are_kept() -> None:
    """Rows of a pairs-table version from before chosen_cut/rejected_cut read as null there."""
    rows = many({"a": 2}).drop(columns=["chosen_cut", "rejected_cut"]).assign(chosen_cut=None, rejected_cut=None)
    data = PreferenceData(rows=rows, source="pairs@3")
    assert len(to_dpo_dataset(data)) == 2 and data.summary["dropped"]["cut"] == 0  # type: ignore[index]


# --- a retrain run records the summary and its report prints it ---


def test_a_retrain_run_records_the_training_data_and_reports_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    policy, _ = make_tiny(tmp_path / "tiny")
    reg = Registry(tmp_path / "registry")
    card = reg.register("policy", policy, kind="policy")
    reg.promote("policy", card.version)
    criteria = tmp_path / "criteria.yaml"
    criteria.write_text(yaml.safe_dump({"name": "c", "held_out_prompts": ["Hi."], "behaviour": []}))
    prefs = write_jsonl(tmp_path / "prefs.jsonl", KNOWN)

    def stop(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("stop before evaluating")

    # The summary is recorded before the parent is evaluated; stop there.
    monkeypatch.setattr("tuneloop.trainer.evaluate.evaluate", stop)
    config = load_config(RetrainConfig, None, [
        f"registry_root={reg.root}", f"runs_dir={tmp_path / 'runs'}", f"preferences.path={prefs}",
        f"criteria={criteria}", "gates.min_new_pairs=1", "preferences.max_pairs_per_prompt=1", "dpo.seed=7",
    ])
    with pytest.raises(RuntimeError, match="stop before evaluating"):
        run_retrain(config)
    (run_dir,) = (tmp_path / "runs").iterdir()
    recorded = json.loads((run_dir / "state.json").read_text())["steps"]["training_data"]
    assert (recorded["trained_pairs"], recorded["seed"], recorded["max_pairs_per_prompt"]) == (2, 7, 1)
    assert recorded["dropped"]["balance"] == 1
    assert json.loads((run_dir / "report.json").read_text())["training_data"] == recorded
    md = (run_dir / "report.md").read_text()
    assert "## Training data" in md and "| left out: the per-prompt cap (max_pairs_per_prompt: 1) | 1 |" in md
