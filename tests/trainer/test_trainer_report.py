"""report.md of a retrain run: the held-out answers and the probes of the parent and the candidate
side by side, each with the checks it passed, read from the run folder as retrain leaves it
(criteria.yaml, eval_before.json and eval_after.json written by `evaluate`)."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tuneloop.trainer import criteria as cr
from tuneloop.trainer import report
from tuneloop.trainer.evaluate import evaluate

CRITERIA = {
    "name": "side-by-side",
    "generation": {"max_new_tokens": 4, "batch_size": 4},
    "held_out_prompts": ["How do I reset my password?", "Pipes | in a prompt?", "Show me code.", "Say nothing."],
    "behaviour": [
        {"name": "starts-with-sure", "kind": "regex", "pattern": "^Sure"},
        {"name": "no-sorry", "kind": "keyword_absent", "keywords": ["sorry"]},
    ],
    "probes": {"items": [{"prompt": "What is the capital of France?", "expect": "Paris"},
                         {"prompt": "How many days are in a week?", "expect": "seven"}]},
}

# What the parent and the candidate "said": the hard cases for a Markdown table cell.
PARENT = [
    "Sorry | I can't help with that.",
    "Sure.\nFirst line\n\nAfter a blank line",
    "```python\nif x:\n    y = a | b\n```",
    "",
]
CANDIDATE = [
    "Sure: open Settings, then Security.",
    "Sure, <b>bold</b> & <script>alert(1)</script>",
    "Sure: a back\\slash, an escaped \\| pipe and a `tick",
    "Sure.",
]
PROBES_PARENT = ["Paris.", "Seven."]
PROBES_CANDIDATE = ["Lyon.", "seven days"]


def _run_folder(tmp_path: Path, parent: Path, candidate: Path) -> Path:
    """A run folder as retrain leaves it, from real evaluations of two tiny policies, with the
    answers then replaced by PARENT and CANDIDATE (the tiny models' own are empty)."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "criteria.yaml").write_text(yaml.safe_dump(CRITERIA))
    spec = cr.load_criteria(run_dir / "criteria.yaml")
    for name, model, answers, probes in (("eval_before.json", parent, PARENT, PROBES_PARENT),
                                         ("eval_after.json", candidate, CANDIDATE, PROBES_CANDIDATE)):
        evaluation = json.loads(json.dumps(evaluate(model, spec)))
        for row, text in zip(evaluation["held_out"], answers, strict=True):
            row["output"] = text
        for row, probe, text in zip(evaluation["probes"], spec.probes.items, probes, strict=True):
            row.update(output=text, passed=cr.probe_passes(probe, text))
        evaluation["behaviour"] = {c.name: cr.pass_rate(c, answers) for c in spec.behaviour}
        (run_dir / name).write_text(json.dumps(evaluation, indent=2))
    return run_dir


def _finish(run_dir: Path) -> str:
    spec = cr.load_criteria(run_dir / "criteria.yaml")
    before, after = (json.loads((run_dir / f).read_text()) for f in ("eval_before.json", "eval_after.json"))
    verdict = cr.compare(before, after, spec)
    report.write_report(run_dir, {"run_id": "r1", "status": "refused", "reason": verdict.summary(),
                                  "parent": "policy@v0001", "candidate": "policy@v0002", "algorithm": "dpo",
                                  "criteria_name": spec.name, "verdict": verdict.model_dump()})
    return (run_dir / "report.md").read_text()


def _tables(markdown: str) -> dict[str, list[list[str]]]:
    """Each '## ' section's table as rendered (GFM table rules): rows of cell HTML."""
    from markdown_it import MarkdownIt

    rendered = MarkdownIt("commonmark").enable("table").render(markdown)
    out: dict[str, list[list[str]]] = {}
    for title, body in re.findall(r"<h2>(.*?)</h2>(.*?)(?=<h2>|\Z)", rendered, re.S):
        rows = re.findall(r"<tr>(.*?)</tr>", body, re.S)
        out[html.unescape(title)] = [re.findall(r"<td>(.*?)</td>", r, re.S) for r in rows if "<td>" in r]
    return out


def _text(cell_html: str) -> str:
    """A cell's HTML back to the text a reader sees: line breaks, entities and spaces undone."""
    return html.unescape(cell_html.replace("<br>", "\n")).replace("\xa0", " ")


def _answer_and_marks(cell_html: str) -> tuple[str, str]:
    answer, _, marks = _text(cell_html).rpartition("\n")
    return answer, marks


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, tiny_policies: tuple[Path, Path]) -> dict[str, Any]:
    run_dir = _run_folder(tmp_path_factory.mktemp("report"), *tiny_policies)
    return {"dir": run_dir, "markdown": _finish(run_dir)}


def test_every_held_out_prompt_has_both_answers_whole_with_their_checks(run: dict[str, Any]) -> None:
    rows = _tables(run["markdown"])["Held-out answers: parent vs candidate"]
    assert [_text(r[0]) for r in rows] == CRITERIA["held_out_prompts"]
    spec = cr.load_criteria(run["dir"] / "criteria.yaml")
    for row, parent, candidate in zip(rows, PARENT, CANDIDATE, strict=True):
        for cell, said in ((row[1], parent), (row[2], candidate)):
            answer, marks = _answer_and_marks(cell)
            assert answer == (said.strip() or "(empty)")
            expected = [("✓ " if cr.check_passes(c, said) else "✗ ") + f"behaviour:{c.name}" for c in spec.behaviour]
            assert marks == ", ".join(expected)
    assert "Passing every behaviour check: parent 1 of 4, candidate 4 of 4." in run["markdown"]


def test_probes_before_and_after_with_what_they_expect(run: dict[str, Any]) -> None:
    rows = _tables(run["markdown"])["Probes: parent vs candidate"]
    assert len(rows) == len(CRITERIA["probes"]["items"])
    for row, probe, parent, candidate in zip(rows, CRITERIA["probes"]["items"], PROBES_PARENT, PROBES_CANDIDATE,
                                             strict=True):
        assert _text(row[0]) == f"{probe['prompt']}\nexpects: {probe['expect']}"
        for cell, said in ((row[1], parent), (row[2], candidate)):
            passed = probe["expect"].lower() in said.lower()
            assert _answer_and_marks(cell) == (said, ("✓ " if passed else "✗ ") + "probes")
    assert "Right: parent 2 of 2, candidate 1 of 2." in run["markdown"]


def test_the_raw_markdown_escapes_what_would_break_the_table(run: dict[str, Any]) -> None:
    md = run["markdown"]
    assert "| Pipes \\| in a prompt? |" in md
    assert "Sorry \\| I can't help with that.<br>✗ behaviour:starts-with-sure" in md
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in md and "<script>" not in md
    assert "&nbsp;&nbsp;&nbsp;&nbsp;y = a \\| b" in md  # code keeps its indentation
    # Every table row has exactly its header's number of cells: no pipe or line break leaked.
    section = md.split("## Held-out answers: parent vs candidate")[1].split("\n## ")[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    assert len(rows) == 2 + len(CRITERIA["held_out_prompts"])
    assert all(len(re.findall(r"(?<!\\)\|", line.replace("\\\\", ""))) == 4 for line in rows)


def test_answers_json_holds_the_same_pairs_for_the_workbench(run: dict[str, Any]) -> None:
    answers = json.loads((run["dir"] / report.ANSWERS_FILE).read_text())
    assert [r["before"]["output"] for r in answers["held_out"]] == PARENT
    assert [r["after"]["output"] for r in answers["held_out"]] == CANDIDATE
    assert [r["after"]["checks"][1]["passed"] for r in answers["held_out"]] == [True] * 4


def test_no_answers_section_until_both_evaluations_exist(run: dict[str, Any], tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for name in ("criteria.yaml", "eval_before.json"):
        (run_dir / name).write_text((run["dir"] / name).read_text())
    report.write_report(run_dir, {"run_id": "r2", "status": "failed", "error": "training failed"})
    md = (run_dir / "report.md").read_text()
    assert "parent vs candidate" not in md and "## Error" in md
    assert not (run_dir / report.ANSWERS_FILE).exists()
