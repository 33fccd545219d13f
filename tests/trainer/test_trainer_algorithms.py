"""The stage registry: every algorithm is a `tuneloop train` command with the same options,
retrain's `algorithm:` is one of its policy algorithms, and both run a stage through it."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, get_args

import pytest
import typer
from typer.testing import CliRunner

from tuneloop.trainer import algorithms
from tuneloop.trainer.algorithms import ALGORITHMS, PolicyAlgorithm
from tuneloop.trainer.cli import cli
from tuneloop.trainer.config import ConfigError, DPOParams, load_config
from tuneloop.trainer.retrain import TRAIN_DIR, RetrainConfig, Run, _train_here
from tuneloop.trainer.stages import StageData, StageResult, StageRun

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def keep_log_handlers() -> Iterator[None]:
    """The CLI points the root logger at its (captured, soon closed) stderr; put it back after."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def _options(command: Any) -> dict[str, list[str]]:
    return {p.name: p.opts for p in command.params if p.param_type_name == "option"}


def test_every_algorithm_is_a_command_with_the_stage_options() -> None:
    assert list(ALGORITHMS) == ["sft", "dpo", "ppo", "rloo", "grpo", "reward"]
    commands = typer.main.get_command(cli).commands  # type: ignore[attr-defined]
    for name, algorithm in ALGORITHMS.items():
        options = _options(commands[name])
        assert options["config"] == ["--config", "-c"] and options["set_"] == ["--set", "-s"], name
        assert ("resume" in options) == algorithm.resumable, name
        if algorithm.resumable:
            assert options["resume"] == ["--resume"]
        assert commands[name].help == algorithm.help
    assert not ALGORITHMS["reward"].resumable  # one short run, registered rather than resumed


def test_retrain_names_the_policy_algorithms_each_with_its_section() -> None:
    policy = algorithms.policy_algorithms()
    assert {a.name for a in policy} == set(get_args(PolicyAlgorithm)) == {"dpo", "ppo", "rloo", "grpo"}
    for algorithm in policy:
        assert RetrainConfig.model_fields[algorithm.name].annotation is algorithm.params
    assert [a.name for a in policy if not a.needs_reward] == ["dpo"]
    with pytest.raises(ConfigError, match="unknown algorithm 'xyz'; known: sft, dpo"):
        algorithms.get("xyz")


def test_the_cli_runs_a_stage_through_the_registry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, keep_log_handlers: None
) -> None:
    calls: list[tuple[str, Any, bool]] = []

    def run_stage(self: algorithms.Algorithm, config: Any, resume: bool = False) -> StageResult:
        calls.append((self.name, config, resume))
        return StageResult(self.name, str(tmp_path / "model"), 1, 0.5, 0.1, None)

    monkeypatch.setattr(algorithms.Algorithm, "run_stage", run_stage)
    sets = ["--set", "model=m", "--set", f"output_dir={tmp_path}", "--set", "preferences.path=p.jsonl"]
    result = CliRunner().invoke(cli, ["dpo", *sets, "--set", "beta=0.3", "--resume"])
    assert result.exit_code == 0, result.output
    ((name, config, resume),) = calls
    assert (name, config.beta, resume) == ("dpo", 0.3, True)
    assert '"stage": "dpo"' in result.output and '"registered": null' in result.output


def test_retrain_trains_through_the_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = load_config(RetrainConfig, ROOT / "examples" / "retrain.yaml", [
        f"criteria={tmp_path / 'criteria.yaml'}", "dpo.beta=0.25", "metrics.run_label=null",
    ])
    run = Run(tmp_path, config, {"run_id": "run-1", "parent": "policy@v0001", "steps": {}})
    seen: list[tuple[Any, StageData, StageRun]] = []

    def train(params: Any, data: StageData, where: StageRun) -> StageResult:
        seen.append((params, data, where))
        return StageResult("dpo", str(where.output_dir / "model"), 3, 0.1, 1.0, None)

    monkeypatch.setitem(ALGORITHMS, "dpo", replace(ALGORITHMS["dpo"], train=train))
    pairs = object()
    out = _train_here(run, pairs, None)

    ((params, data, where),) = seen
    assert isinstance(params, DPOParams) and params.beta == 0.25
    assert data.preferences is pairs and data.reward is None
    assert (where.model, where.output_dir, where.resume) == ("policy@v0001", tmp_path / TRAIN_DIR, True)
    assert where.criteria == tmp_path / "criteria.yaml" and where.metrics is not None
    assert where.metrics.run_label == "run-1"
    assert out["stage"] == "dpo" and out["steps"] == 3

    # An algorithm that trains against rewards refuses to start without them.
    rloo = Run(tmp_path, config.model_copy(update={"algorithm": "rloo"}), run.state)
    with pytest.raises(ConfigError, match="rloo needs rewards"):
        _train_here(rloo, pairs, None)
