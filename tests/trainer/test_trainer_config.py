"""Stage configs: YAML + --set overrides, device defaults, errors that name the field."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from tuneloop.trainer.cli import cli
from tuneloop.trainer.config import (
    ConfigError,
    DPOStageConfig,
    OnlineRLStageConfig,
    PPOStageConfig,
    load_config,
    parse_overrides,
)
from tuneloop.trainer.retrain import RetrainConfig

ROOT = Path(__file__).resolve().parents[2]
BASE = ["model=m", "output_dir=out", "preferences.path=p.jsonl"]


def test_overrides_parse_yaml_scalars_and_nest() -> None:
    assert parse_overrides(["a.b=1", "a.c=true", "d=[1, 2]", "e=x=y", "f=null"]) == {
        "a": {"b": 1, "c": True},
        "d": [1, 2],
        "e": "x=y",
        "f": None,
    }
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["novalue"])


def test_file_then_overrides(tmp_path: Path) -> None:
    path = tmp_path / "dpo.yaml"
    path.write_text(yaml.safe_dump({"model": "m", "output_dir": "o", "beta": 0.3, "lora": {"enabled": True, "r": 4},
                                    "preferences": {"path": "p.jsonl"}}))
    config = load_config(DPOStageConfig, path, ["lora.r=8", "loss_type=ipo"])
    assert config.beta == 0.3 and config.lora.enabled and config.lora.r == 8 and config.loss_type == "ipo"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU defaults")
def test_cpu_defaults_avoid_what_fails_on_cpu() -> None:
    config = load_config(DPOStageConfig, None, BASE)
    assert (config.bf16, config.gradient_checkpointing, config.optim) == (False, False, "adamw_torch")
    # An explicit choice is kept.
    assert load_config(DPOStageConfig, None, [*BASE, "optim=sgd"]).optim == "sgd"


@pytest.mark.parametrize(
    ("sets", "field"),
    [
        (["max_steps=0"], "max_steps"),
        (["lora.rank=4"], "lora.rank"),
        (["loss_type=nope"], "loss_type"),
        (["preferences.store_root=/s"], "preferences"),  # both a store and a file
        (["learning_rate=fast"], "learning_rate"),
    ],
)
def test_invalid_fields_are_named(sets: list[str], field: str) -> None:
    with pytest.raises(ConfigError, match=rf"(^|\W){field}\W"):
        load_config(DPOStageConfig, None, [*BASE, *sets])


def test_cross_field_rules() -> None:
    base = ["model=m", "output_dir=o", "prompts=p.jsonl", "reward.model=r"]
    with pytest.raises(ConfigError, match="num_generations"):
        load_config(OnlineRLStageConfig, None, [*base, "per_device_train_batch_size=3", "num_generations=2"])
    with pytest.raises(ConfigError, match="reward"):
        load_config(OnlineRLStageConfig, None, [*base, "reward.target=host:1"])
    with pytest.raises(ConfigError, match="rollout_batch_size"):
        load_config(PPOStageConfig, None, [*base, "rollout_batch_size=6", "per_device_train_batch_size=4"])
    with pytest.raises(ConfigError, match="trl_args"):
        load_config(PPOStageConfig, None, [*base, "trl_args.foo=1"])


def test_example_retrain_config_is_valid() -> None:
    config = load_config(RetrainConfig, ROOT / "examples" / "retrain.yaml")
    assert config.algorithm == "dpo" and config.reward_model is not None
    with pytest.raises(ConfigError, match="reward_model"):
        load_config(RetrainConfig, ROOT / "examples" / "retrain.yaml", ["reward_model.min_accuracy=2"])
    # The pipeline owns the reward model's data: reward_model is typed and names what it refuses.
    with pytest.raises(ConfigError, match=r"reward_model\.store_root: Extra inputs are not permitted"):
        load_config(RetrainConfig, ROOT / "examples" / "retrain.yaml", ["reward_model.store_root=/x"])
    with pytest.raises(ConfigError, match=r"reward_model\.bogus: Extra inputs are not permitted"):
        load_config(RetrainConfig, ROOT / "examples" / "retrain.yaml", ["reward_model.bogus=1"])
    lora = load_config(RetrainConfig, ROOT / "examples" / "retrain.yaml", ["reward_model.lora.enabled=true"])
    assert lora.reward_model is not None and lora.reward_model.lora.enabled


def test_ties_and_both_bad_are_dropped_from_policy_training() -> None:
    """DPO and online RL read preference pairs only: 'keep' would keep rows that are then
    dropped, so the config refuses it, naming the field."""
    assert load_config(DPOStageConfig, None, [*BASE, "preferences.tie_policy=drop"]).preferences.tie_policy == "drop"
    for field in ("tie_policy", "both_bad_policy"):
        with pytest.raises(ConfigError, match=rf"preferences\.{field}: .*'keep' is not supported"):
            load_config(DPOStageConfig, None, [*BASE, f"preferences.{field}=keep"])
        with pytest.raises(ConfigError, match=rf"preferences\.{field}:"):
            load_config(RetrainConfig, ROOT / "examples" / "retrain.yaml", [f"preferences.{field}=keep"])


@pytest.fixture
def keep_log_handlers() -> Iterator[None]:
    """The CLI points the root logger at its (captured, soon closed) stderr; put it back after."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_cli_exits_2_naming_the_field(tmp_path: Path, keep_log_handlers: None) -> None:
    result = CliRunner().invoke(cli, ["dpo", *sum((["--set", s] for s in [*BASE, "beta=-1"]), [])])
    assert result.exit_code == 2
    assert "beta" in result.output
    result = CliRunner().invoke(cli, ["retrain", "--config", str(tmp_path / "missing.yaml")])
    assert result.exit_code == 2 and "does not exist" in result.output
