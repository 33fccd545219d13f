"""Choosing the checkpoint a retrain registers (services/trainer/selection.py), on evaluation
results built from answer texts by the criteria's own checks, as `evaluate` builds them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tuneloop.trainer import criteria as cr
from tuneloop.trainer import selection
from tuneloop.trainer.report import checkpoints_markdown, plot_checkpoints

CRITERIA = cr.Criteria.model_validate({
    "name": "tldr",
    "held_out_prompts": ["a", "b", "c", "d"],
    "behaviour": [{"name": "tldr", "kind": "regex", "pattern": "^TL;DR", "min_pass_rate": 0.75}],
    "probes": {"items": [{"prompt": "Capital of France?", "expect": "Paris"},
                         {"prompt": "2+2?", "expect": "4"}]},
    "length_drift": None,
})


def evaluation(answers: list[str], probes: list[str]) -> dict[str, Any]:
    probe_rows = [{"prompt": p.prompt, "expect": p.expect, "output": a, "passed": cr.probe_passes(p, a)}
                  for p, a in zip(CRITERIA.probes.items, probes, strict=True)]
    return {
        "held_out": [{"prompt": p, "output": a, "tokens": len(a.split()), "reward": None}
                     for p, a in zip(CRITERIA.held_out_prompts, answers, strict=True)],
        "probes": probe_rows,
        "behaviour": {c.name: cr.pass_rate(c, answers) for c in CRITERIA.behaviour},
        "degeneration": cr.degeneration_stats(answers + probes, CRITERIA.degeneration),
        "mean_length_tokens": sum(len(a.split()) for a in answers) / len(answers),
        "reward_mean": None,
        "kl_to_reference": None,
        "probe_pass_rate": sum(p["passed"] for p in probe_rows) / len(probe_rows),
    }


PARENT = evaluation(["Sure, here it is.", "Well, the answer is this.", "It depends on you.", "Let me think it over."],
                    ["Paris, of course.", "It is 4."])
PARENT_ANSWERS = [r["output"] for r in PARENT["held_out"]]
TLDR = ["TL;DR yes it is.", "TL;DR the answer.", "TL;DR it depends.", "TL;DR let me think."]


def candidate(name: str, step: int) -> selection.Candidate:
    return selection.Candidate(name, step, Path(f"/nowhere/{name}"))


def test_the_passing_checkpoint_with_most_progress_is_chosen_over_a_final_one_that_forgot() -> None:
    evaluated = [
        (candidate("checkpoint-10", 10), evaluation(TLDR[:2] + PARENT_ANSWERS[2:], ["Paris.", "4"])),  # moved half
        (candidate("checkpoint-20", 20), evaluation(TLDR[:3] + PARENT_ANSWERS[3:], ["Paris.", "4"])),  # passes
        (candidate("final", 30), evaluation(TLDR, ["La capitale est belle.", "4"])),  # all TL;DR, forgot Paris
    ]
    chosen, rows = selection.choose(PARENT, evaluated, CRITERIA)
    assert chosen is not None and chosen.name == "checkpoint-20"
    assert [(r["name"], r["passed"], r["chosen"]) for r in rows] == [
        ("checkpoint-10", False, False), ("checkpoint-20", True, True), ("final", False, False)]
    assert rows[1]["progress"] == 0.75
    assert any(f.startswith("probes:") and "Capital of France" in f for f in rows[2]["failures"])
    assert any(f.startswith("behaviour:tldr") for f in rows[0]["failures"])


def test_among_equal_progress_the_earliest_step_wins_whatever_the_order_given() -> None:
    passing = evaluation(TLDR, ["Paris.", "4"])
    evaluated = [(candidate("final", 30), passing), (candidate("checkpoint-20", 20), passing),
                 (candidate("checkpoint-10", 10), evaluation(PARENT_ANSWERS, ["Paris.", "4"]))]
    chosen, rows = selection.choose(PARENT, evaluated, CRITERIA)
    assert chosen is not None and chosen.name == "checkpoint-20"
    assert [r["step"] for r in rows] == [10, 20, 30]


def test_none_passing_refuses_with_each_checkpoints_failures() -> None:
    evaluated = [(candidate("checkpoint-10", 10), evaluation(PARENT_ANSWERS, ["Paris.", "4"])),
                 (candidate("final", 20), evaluation(TLDR, ["Rome.", "4"]))]
    chosen, rows = selection.choose(PARENT, evaluated, CRITERIA)
    assert chosen is None and not any(r["chosen"] for r in rows)
    reason = selection.refusal(rows)
    assert "checkpoint-10 (step 10): behaviour:tldr" in reason and "final (step 20): probes" in reason


def test_candidates_are_the_newest_complete_checkpoints_before_the_final_step(tmp_path: Path) -> None:
    for step, complete in ((10, True), (20, True), (25, False), (30, True), (40, True)):
        folder = tmp_path / "checkpoints" / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        if complete:
            (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    found = selection.candidates(tmp_path, final_step=40, count=3)
    assert [(c.name, c.step) for c in found] == [("checkpoint-20", 20), ("checkpoint-30", 30), ("final", 40)]
    assert found[-1].path == tmp_path / "model"
    assert [c.name for c in selection.candidates(tmp_path, final_step=40, count=1)] == ["final"]


def test_report_shows_the_criteria_per_checkpoint(tmp_path: Path) -> None:
    evaluated = [(candidate("checkpoint-10", 10), evaluation(PARENT_ANSWERS, ["Paris.", "4"])),
                 (candidate("final", 20), evaluation(TLDR, ["Paris.", "4"]))]
    _, rows = selection.choose(PARENT, evaluated, CRITERIA)
    table = "\n".join(checkpoints_markdown(rows))
    assert "| checkpoint-10 | 10 | 0 | 1 | - | 0 | FAIL: behaviour:tldr" in table
    assert "| final | 20 | 1 | 1 | - | 1 | **chosen** |" in table
    assert plot_checkpoints(rows, tmp_path / "c.png") is not None and (tmp_path / "c.png").stat().st_size > 0

