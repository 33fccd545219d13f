"""Reward-model stage: Bradley–Terry training with the tiny models, the held-out gate, and
registration (promoted above the bar, refused with its reason below it)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml

from tuneloop.common.tiny_models import make_tiny
from tuneloop.common.registry import Registry
from tuneloop.common.reward_format import prompt_key
from tuneloop.trainer import reward_stage
from tuneloop.trainer.config import load_config
from tuneloop.trainer.reward_stage import RewardStageConfig, split_by_prompt, training_pairs
from tests.support.preferences import synthetic_rows


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("tiny"))[1]


@pytest.fixture
def rows_file(tmp_path: Path) -> Path:
    path = tmp_path / "rows.parquet"
    synthetic_rows().to_parquet(path)
    return path


def _config(tiny: Path, rows_file: Path, registry: Path, **over: object) -> RewardStageConfig:
    base = dict(
        base_model=str(tiny),
        dataset_path=rows_file,
        registry_root=registry,
        learning_rate=3e-3,
        max_steps=12,
        batch_size=8,
        min_eval_pairs=5,
        min_accuracy=0.7,
        seed=0,
    )
    return RewardStageConfig(**{**base, **over})


def test_split_is_by_prompt_and_seeded() -> None:
    rows = synthetic_rows()
    train, held = split_by_prompt(rows, 0.25, seed=3)
    train_keys = {prompt_key(p) for p in train["prompt"]}
    held_keys = {prompt_key(p) for p in held["prompt"]}
    assert not train_keys & held_keys
    assert len(held_keys) == 16 and len(train) + len(held) == len(rows)
    again, _ = split_by_prompt(rows, 0.25, seed=3)
    other, _ = split_by_prompt(rows, 0.25, seed=4)
    assert again.equals(train)
    assert {prompt_key(p) for p in other["prompt"]} != train_keys


def test_tie_and_both_bad_rules() -> None:
    rows = pd.DataFrame(
        [
            dict(prompt="q", chosen="a", rejected="b", label="preference"),
            dict(prompt="q", chosen="c", rejected="d", label="tie"),
            dict(prompt="q", chosen="e", rejected="f", label="both_bad"),
        ]
    )
    pairs, counts = training_pairs(rows, ties="drop", both_bad="drop")
    assert pairs == [("q", "a", "b")]
    assert counts["dropped_tie"] == 1 and counts["dropped_both_bad"] == 1
    pairs, counts = training_pairs(rows, ties="symmetric", both_bad="drop")
    assert pairs == [("q", "a", "b"), ("q", "c", "d"), ("q", "d", "c")]
    assert counts["dropped_tie"] == 0 and counts["dropped_both_bad"] == 1
    pairs, _ = training_pairs(rows, ties="drop", both_bad="symmetric")
    assert pairs == [("q", "a", "b"), ("q", "e", "f"), ("q", "f", "e")]


def test_config_needs_exactly_one_data_source(tiny: Path) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        RewardStageConfig(base_model=str(tiny))
    with pytest.raises(ValueError, match="snapshot needs store_root"):
        RewardStageConfig(base_model=str(tiny), dataset_path="x.parquet", snapshot="pairs@1")


def test_trains_above_chance_registers_and_promotes(tiny: Path, rows_file: Path, tmp_path: Path) -> None:
    config_file = tmp_path / "reward.yaml"
    config = _config(tiny, rows_file, tmp_path / "registry", ties="symmetric")
    config_file.write_text(yaml.safe_dump(config.model_dump(mode="json")))

    # Loaded as `tuneloop train reward --config reward.yaml --set seed=0` loads it.
    result = reward_stage.run(load_config(RewardStageConfig, config_file, ["seed=0"]))
    out = result.registered
    assert out is not None and result.stage == "reward" and result.steps == 12

    heldout = out.metrics["heldout"]
    assert out.promoted and out.refused_reason is None
    assert heldout["accuracy"] >= 0.7 > out.metrics["heldout_before"]["accuracy"]
    # Unanimous items are learnable; on 2:1 split items at most two of three votes can be right.
    assert heldout["pairs_unanimous"] > 0 and heldout["pairs_split"] > 0
    assert heldout["accuracy_unanimous"] == 1.0
    assert heldout["accuracy_split"] <= 2 / 3
    rows = out.metrics["rows"]
    assert rows["tie"] > 0 and rows["dropped_tie"] == 0  # symmetric: kept as two orders
    assert rows["both_bad"] == rows["dropped_both_bad"] > 0

    registry = Registry(tmp_path / "registry")
    assert registry.current("reward") == out.version
    assert result.model_dir == str(registry.resolve(out.ref))
    card = registry.card(out.ref)
    assert card.kind == "reward"
    assert card.metrics["gate"]["passed"] is True
    assert card.training_config["ties"] == "symmetric"


def test_below_the_bar_is_registered_but_refused(tiny: Path, rows_file: Path, tmp_path: Path) -> None:
    registry = Registry(tmp_path / "registry")
    baseline = registry.register("reward", tiny, kind="reward").version
    registry.promote("reward", baseline)

    # Split items make a perfect held-out score impossible, so a bar of 1.0 must refuse.
    out = reward_stage.run(
        _config(tiny, rows_file, tmp_path / "registry", base_model="reward@production", min_accuracy=1.0, max_steps=2)
    ).registered

    assert out is not None and out.promoted is False
    assert out.refused_reason is not None and "below min_accuracy=1.0" in out.refused_reason
    assert registry.current("reward") == baseline
    card = registry.card(out.ref)
    assert card.parent == f"reward@{baseline}"
    assert card.metrics["gate"] == {
        "min_accuracy": 1.0,
        "min_eval_pairs": 5,
        "passed": False,
        "refused_reason": out.refused_reason,
    }


def test_lora_trains_the_adapters_and_the_head_and_registers_a_plain_model(
    tiny: Path, rows_file: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForSequenceClassification

    from tuneloop.reward.scorer import ModelScorer, agreement_with_labels
    from tuneloop.v1 import completion_pb2

    config = load_config(RewardStageConfig, None, [
        f"base_model={tiny}", f"dataset_path={rows_file}", f"registry_root={tmp_path / 'registry'}",
        "learning_rate=3e-3", "max_steps=12", "batch_size=8", "min_eval_pairs=5", "min_accuracy=0.7",
        "lora.enabled=true", "lora.r=8", "lora.alpha=16",
    ])
    out = reward_stage.run(config).registered
    assert out is not None and out.promoted, out.refused_reason

    # The adapters are merged: the version is an ordinary model, as the Reward service loads it.
    folder = Registry(tmp_path / "registry").resolve(out.ref)
    assert not (folder / "adapter_config.json").exists()
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    assert not [n for n, _ in model.named_parameters() if "lora" in n]
    scorer = ModelScorer(folder, completion_pb2.ModelVersion(), "cpu", 512)
    _, held = split_by_prompt(synthetic_rows(), 0.2, seed=0)
    served = agreement_with_labels(held, scorer)
    assert served["pairs"] == out.metrics["heldout"]["pairs"]
    assert served["accuracy"] == pytest.approx(out.metrics["heldout"]["accuracy"], abs=1 / served["pairs"])
    assert Registry(tmp_path / "registry").card(out.ref).training_config["lora"]["enabled"] is True


@pytest.mark.heavy
def test_minilm_backbone_trains_and_scores_like_the_service(rows_file: Path, tmp_path: Path) -> None:
    from tuneloop.common.model_import import import_minilm
    from tuneloop.reward.scorer import ModelScorer, agreement_with_labels
    from tuneloop.v1 import completion_pb2

    folder = import_minilm(tmp_path / "minilm")
    out = reward_stage.run(
        _config(folder, rows_file, tmp_path / "registry", base_model=str(folder), learning_rate=5e-5, max_steps=20)
    ).registered
    assert out is not None and out.promoted, out.refused_reason
    # The registered model scores the held-out rows the same through the service's scorer.
    registry = Registry(tmp_path / "registry")
    scorer = ModelScorer(registry.resolve(out.ref), completion_pb2.ModelVersion(), "cpu", 512)
    _, held = split_by_prompt(synthetic_rows(), 0.2, seed=0)
    assert agreement_with_labels(held, scorer) == out.metrics["heldout"]
