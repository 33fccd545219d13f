"""Rows' weights honoured by sampling: the sampler draws in proportion to weight and never a
row of weight 0; the weights reach DPO and the reward model through TRL's preprocessing."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pandas as pd
import pytest
from datasets import Dataset

from tuneloop.common.tiny_models import make_tiny
from tuneloop.trainer import weighting
from tuneloop.trainer.config import ConfigError, DPOStageConfig, load_config
from tuneloop.trainer.data import PreferenceData, to_dpo_dataset
from tuneloop.trainer.reward_stage import RewardStageConfig, run as run_reward_stage, weighted_training_pairs
from tuneloop.trainer.stages import run_dpo
from tuneloop.trainer.weighting import row_weights, weighted, weighted_sampler

TOPICS = ["cats", "rain", "tea", "maps", "trains", "books", "music", "bread"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    policy, reward = make_tiny(tmp_path_factory.mktemp("tiny") / "models")
    return {"policy": policy, "reward": reward}


@pytest.fixture
def drawn(monkeypatch: pytest.MonkeyPatch) -> list[list[float]]:
    """The weights of every weighted sampler a trainer builds (the real sampler is used)."""
    calls: list[list[float]] = []
    real = weighting.weighted_sampler

    def spy(weights: list[float], seed: int) -> Any:
        calls.append(list(weights))
        return real(weights, seed)

    monkeypatch.setattr(weighting, "weighted_sampler", spy)
    return calls


# --- the sampler ---


def test_the_sampler_draws_rows_in_proportion_to_their_weight() -> None:
    weights = [0.0, 1.0, 2.0, 5.0]
    sampler = weighted_sampler(weights, seed=7)
    counts: Counter[int] = Counter()
    for _ in range(5000):  # each pass is one epoch: len(weights) draws
        counts.update(sampler)
    total = sum(counts.values())
    assert total == 5000 * len(weights)
    assert counts[0] == 0, "a row of weight 0 is never drawn"
    for row, weight in enumerate(weights[1:], start=1):
        assert counts[row] / total == pytest.approx(weight / sum(weights), abs=0.03)
    assert list(weighted_sampler(weights, seed=7)) == list(weighted_sampler(weights, seed=7)), "seeded"


class _Trainer:
    """Stands in for transformers' Trainer: its own sampler, its args, its prepared dataset."""

    def __init__(self, dataset: Dataset, seed: int = 3) -> None:
        self.train_dataset = dataset
        self.args = SimpleNamespace(seed=seed, data_seed=None)

    def _get_train_sampler(self, train_dataset: Any = None) -> str:
        return "the trainer's own"


def test_weights_are_read_before_the_dataloader_drops_the_column_and_equal_ones_change_nothing() -> None:
    weights = [0.0, 1.0, 3.0, 2.0, 0.0, 1.0]
    prepared = Dataset.from_dict({"chosen_ids": [[n] for n in range(6)], "weight": weights})
    pruned = prepared.remove_columns("weight")  # what the trainer hands its sampler
    first_epoch = list(weighted(_Trainer)(prepared)._get_train_sampler(pruned))
    assert first_epoch == list(weighted_sampler(weights, seed=3)), "drawn by weight, seeded by the trainer's seed"
    assert 0 not in first_epoch and 4 not in first_epoch
    for same in ([1.0] * 6, [0.5] * 6):
        even = Dataset.from_dict({"chosen_ids": [[n] for n in range(6)], "weight": same})
        assert weighted(_Trainer)(even)._get_train_sampler(pruned) == "the trainer's own"
    assert weighted(_Trainer)(pruned)._get_train_sampler(pruned) == "the trainer's own"
    for bad, message in (([0.0, 0.0], "every row has weight 0"), ([1.0, -1.0], "not a finite number")):
        with pytest.raises(ValueError, match=message):
            row_weights(Dataset.from_dict({"weight": bad}))


# --- the stages ---


def _store_rows(weights: list[float]) -> pd.DataFrame:
    """Rows as the store's read API returns them (the columns its exporter reads)."""
    return pd.DataFrame(
        [
            {"row_id": f"e{i}#0", "event_id": f"e{i}", "item_id": f"i{i}", "annotator_id": "a", "rule": "pairwise",
             "label": "preference", "prompt": [{"role": "user", "content": f"Tell me about {TOPICS[i]}."}],
             "prompt_raw": None, "chosen": "Sure.", "rejected": "No.", "weight": w}
            for i, w in enumerate(weights)
        ]
    )


def test_the_stores_weights_reach_the_dpo_dataset_unless_switched_off() -> None:
    data = PreferenceData(rows=_store_rows([0.5, 1.0, 0.5]), source="pairs@1")
    assert to_dpo_dataset(data)["weight"] == [0.5, 1.0, 0.5]
    assert "weight" not in to_dpo_dataset(data, honour_weight=False).column_names
    with pytest.raises(ConfigError, match="every row has weight 0"):
        to_dpo_dataset(PreferenceData(rows=_store_rows([0.0, 0.0]), source="pairs@1"))


def test_dpo_draws_by_the_files_weights_and_trains(
    tiny: dict[str, Path], tmp_path: Path, drawn: list[list[float]]
) -> None:
    weights = [0.0, 1.0, 1.0, 3.0, 0.0, 1.0, 3.0, 1.0]
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("\n".join(
        json.dumps({"prompt": f"Tell me about {t}.", "chosen": "Sure.", "rejected": "No.", "weight": w})
        for t, w in zip(TOPICS, weights, strict=True)
    ))
    config = load_config(DPOStageConfig, None, [
        f"model={tiny['policy']}", f"output_dir={tmp_path / 'dpo'}", f"preferences.path={prefs}",
        "max_steps=2", "learning_rate=1e-3", "per_device_train_batch_size=4",
    ])
    result = run_dpo(config)
    assert result.steps == 2 and result.train_loss is not None
    assert drawn == [weights], "TRL's preprocessing kept every row's weight, in order"


def test_the_reward_stage_draws_pairs_by_their_rows_weights(
    tiny: dict[str, Path], tmp_path: Path, drawn: list[list[float]]
) -> None:
    rows = []
    for i in range(12):
        prompt = [{"role": "user", "content": f"Question {i}: what about {TOPICS[i % len(TOPICS)]}?"}]
        rows.append(dict(prompt=prompt, chosen="Fine. Thank you!", rejected="Worse.", label="preference",
                         item_id=f"item-{i}", weight=0.5 if i % 2 else 1.0))
        rows.append(dict(prompt=prompt, chosen="A.", rejected="B.", label="tie", item_id=f"tie-{i}", weight=2.0))
    data = pd.DataFrame(rows)
    pairs, weights, _ = weighted_training_pairs(data.head(2), ties="symmetric", both_bad="drop")
    assert weights == [1.0, 2.0, 2.0], "both orders of a symmetric tie take its row's weight"
    path = tmp_path / "rows.parquet"
    data.to_parquet(path)
    config = RewardStageConfig(
        base_model=str(tiny["reward"]), dataset_path=path, registry_root=tmp_path / "registry", ties="symmetric",
        max_steps=2, batch_size=4, min_eval_pairs=1, min_accuracy=0.0, eval_fraction=0.25, seed=0,
    )
    out = run_reward_stage(config).registered
    assert out is not None and out.metrics["train_steps"] == 2
    assert len(drawn) == 1 and len(drawn[0]) == out.metrics["train_pairs"]
    assert sorted(set(drawn[0])) == [0.5, 1.0, 2.0]
    unweighted = run_reward_stage(config.model_copy(update={"honour_weight": False, "promote": False}))
    assert unweighted.steps == 2 and len(drawn) == 1, "honour_weight=False: no weighted draws"
