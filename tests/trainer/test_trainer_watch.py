"""The reward-hacking watch: its rules on plain numbers, then a real TRL DPO run on the tiny
model that pleases its implicit reward while breaking what a criteria file checks, and is stopped
for it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tuneloop.common.tiny_models import make_tiny
from tuneloop.trainer.config import DPOStageConfig, WatchParams, load_config
from tuneloop.trainer.evaluate import evaluate
from tuneloop.trainer.metrics import StepMetrics, read_metrics
from tuneloop.trainer.stages import run_dpo
from tuneloop.trainer.watch import HackingWatch

TOPICS = ["cats", "rain", "tea", "maps", "trains", "books", "music", "bread"]


def watch(tmp_path: Path, **params) -> HackingWatch:
    return HackingWatch(WatchParams(**params), StepMetrics(tmp_path, "dpo"))


def test_reward_up_while_eval_down_is_flagged_once_the_window_shows_it(tmp_path: Path) -> None:
    w = watch(tmp_path, window=3, min_change=0.05)
    w.observe(1, {"reward": 0.1})
    assert w.evaluated(1, 0.9) == []  # one measurement: nothing to compare yet
    w.observe(2, {"reward": 0.5})
    assert w.evaluated(2, 0.88) == []  # eval fell by less than min_change: flat
    w.observe(3, {"reward": 0.9})
    assert w.evaluated(3, 0.6) == ["reward_up_eval_down"]  # against the best of the window (0.9)
    w.observe(4, {"reward": 1.0})
    assert w.evaluated(4, 0.6) == ["reward_up_eval_down"]  # 0.88 is still in the window
    w.observe(5, {"reward": 1.1})
    assert w.evaluated(5, 0.6) == []  # the window no longer holds the 0.9: eval is flat now
    flagged = [r["step"] for r in read_metrics(tmp_path) if r.get("watch_flag") == "reward_up_eval_down"]
    assert flagged == [3, 4]
    assert 'tuneloop_trainer_watch_flags_total{flag="reward_up_eval_down"' in (tmp_path / "metrics.prom").read_text()


def test_reward_and_eval_rising_together_is_not_flagged(tmp_path: Path) -> None:
    w = watch(tmp_path, window=2)
    for step, (reward, ev) in enumerate([(0.1, 0.2), (0.5, 0.4), (0.9, 0.8)], start=1):
        w.observe(step, {"reward": reward})
        assert w.evaluated(step, ev) == []
    assert w.flags == []


def test_kl_and_length_bounds(tmp_path: Path) -> None:
    w = watch(tmp_path, max_kl=5.0, length_ratio=(0.5, 1.5))
    assert w.observe(1, {"kl": 4.0, "response_length_ratio": 1.2}) == []
    assert w.observe(2, {"kl": 6.0, "response_length_ratio": 1.2}) == ["kl_out_of_bounds"]
    assert w.observe(3, {"kl": 1.0, "response_length_ratio": 1.9}) == ["length_out_of_bounds"]
    assert [f["step"] for f in w.flags] == [2, 3]


def test_dpo_that_pleases_its_reward_and_breaks_the_criteria_is_stopped(tmp_path: Path) -> None:
    policy, _ = make_tiny(tmp_path / "models")
    prompts = [f"Tell me about {t}." for t in TOPICS]
    # The untrained tiny model answers nothing but whitespace, and the declared criteria say it
    # should stay silent; the preferences teach it to talk, so the criteria break as DPO succeeds.
    criteria = _criteria(tmp_path / "criteria.yaml", {
        "name": "stay-silent", "held_out_prompts": prompts, "generation": {"max_new_tokens": 6},
        "behaviour": [{"name": "silent", "kind": "regex", "pattern": "^$"}],
    })
    assert evaluate(policy, criteria)["behaviour"]["silent"] == 1.0
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("\n".join(json.dumps({"prompt": p, "chosen": "Sure.", "rejected": "No."}) for p in prompts))
    out = tmp_path / "dpo"
    config = load_config(DPOStageConfig, None, [
        f"model={policy}", f"output_dir={out}", f"preferences.path={prefs}", "max_steps=12", "learning_rate=5e-2",
        f"watch.criteria={criteria}", "watch.eval_every=2", "watch.stop=true", "save_steps=100",
        "per_device_train_batch_size=4",
    ])
    result = run_dpo(config)

    assert result.watch_flags, f"no flag; metrics: {read_metrics(out)}"
    flag = result.watch_flags[0]
    assert flag["flag"] == "reward_up_eval_down"
    assert result.steps == flag["step"] < 12  # stopped at the flag, not at max_steps
    rows = read_metrics(out)
    evals = [r["eval_metric"] for r in rows if "eval_metric" in r]
    assert evals[0] == 1.0 and evals[-1] < 1.0  # the check held for every answer before training, not after
    assert any(r.get("watch_flag") == "reward_up_eval_down" for r in rows)
    assert json.loads((out / "stage.json").read_text())["watch_flags"][0]["flag"] == "reward_up_eval_down"
    assert "tuneloop_trainer_last_success_timestamp_seconds" in (out / "metrics.prom").read_text()


def test_eval_every_without_criteria_fails_before_training(tmp_path: Path) -> None:
    from tuneloop.trainer.config import ConfigError

    policy, _ = make_tiny(tmp_path / "models")
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text(json.dumps({"prompt": "Hi.", "chosen": "Sure.", "rejected": "No."}))
    config = load_config(DPOStageConfig, None, [
        f"model={policy}", f"output_dir={tmp_path / 'dpo'}", f"preferences.path={prefs}", "watch.eval_every=2",
    ])
    with pytest.raises(ConfigError, match="watch.criteria"):
        run_dpo(config)


def _criteria(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec))
    return path
