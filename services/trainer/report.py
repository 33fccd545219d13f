"""A retrain run's report: report.json, report.md, answers.json and plots, all in the run folder.

answers.json holds the held-out answers and probes of the parent and the candidate side by
side with the checks each answer passed; the workbench's run page shows the same file, so a
run reads the same in the browser and in report.md.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from tuneloop.trainer.metrics import read_metrics

log = logging.getLogger(__name__)

TRAINING_PLOT = "training.png"
CRITERIA_PLOT = "criteria.png"
CHECKPOINTS_PLOT = "checkpoints.png"
ANSWERS_FILE = "answers.json"


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display in a Job's pod
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, out: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_training(rows: list[dict[str, Any]], out: Path) -> Path | None:
    """Reward, KL and response length per step (whichever the stage logged)."""
    series = [k for k in ("reward", "eval_metric", "kl", "response_length", "loss") if any(k in r for r in rows)]
    if not series:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(len(series), 1, figsize=(7, 2.2 * len(series)), sharex=True, squeeze=False)
    for ax, key in zip(axes[:, 0], series, strict=True):
        points = [(r["step"], r[key]) for r in rows if key in r]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=".", linewidth=1)
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    fig.suptitle("training per step")
    return _save(fig, out)


def plot_criteria(verdict: dict[str, Any], out: Path) -> Path | None:
    """Before/after value of each measurable criterion, failures in red."""
    rows = [c for c in verdict["criteria"] if c.get("after") is not None and not c.get("skipped")]
    if not rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.5))
    ys = list(range(len(rows)))
    ax.barh([y + 0.2 for y in ys], [c["before"] or 0 for c in rows], height=0.4, color="#9aa5b1", label="parent")
    ax.barh(
        [y - 0.2 for y in ys],
        [c["after"] for c in rows],
        height=0.4,
        color=["#2f9e44" if c["passed"] else "#e03131" for c in rows],
        label="candidate",
    )
    ax.set_yticks(ys, [c["name"] for c in rows])
    ax.invert_yaxis()
    ax.legend(loc="best", fontsize=8)
    ax.set_title("criteria: parent vs candidate (red = fails)")
    return _save(fig, out)


def plot_checkpoints(rows: list[dict[str, Any]], out: Path) -> Path | None:
    """Each behaviour check's pass rate and the probes' pass rate per evaluated checkpoint; the
    chosen one marked, failing ones hollow."""
    if len(rows) < 2:
        return None
    plt = _pyplot()
    steps = [r["step"] for r in rows]
    series = {f"behaviour:{name}": [r["behaviour"].get(name) for r in rows] for name in rows[0]["behaviour"]}
    if any(r.get("probe_pass_rate") is not None for r in rows):
        series["probes"] = [r.get("probe_pass_rate") for r in rows]
    fig, ax = plt.subplots(figsize=(8, 4))
    for name, values in series.items():
        (line,) = ax.plot(steps, values, label=name)
        for step, value, row in zip(steps, values, rows, strict=True):
            if value is not None:
                ax.plot(step, value, "o", color=line.get_color(), fillstyle="full" if row["passed"] else "none")
    for row in rows:
        if row.get("chosen"):
            ax.axvline(row["step"], color="#2f9e44", linestyle="--", label=f"chosen: {row['name']}")
    ax.set_xlabel("step")
    ax.set_ylabel("pass rate")
    ax.set_ylim(-0.05, 1.05)
    ax.legend(loc="best", fontsize=8)
    ax.set_title("criteria per checkpoint (hollow = fails a criterion)")
    return _save(fig, out)


def checkpoints_markdown(rows: list[dict[str, Any]]) -> list[str]:
    names = list(rows[0]["behaviour"]) if rows else []
    lines = [
        "Each evaluated on the criteria; the one passing every criterion with the most progress on the behaviour "
        "is the candidate.",
        "",
        "| checkpoint | step | " + " | ".join(f"behaviour:{n}" for n in names) + " | probes | KL | progress | result |",
        "| --- | --- | " + " | ".join("---" for _ in names) + " | --- | --- | --- | --- |",
    ]
    for r in rows:
        result = "**chosen**" if r.get("chosen") else "pass" if r["passed"] else "FAIL: " + _cell("; ".join(r["failures"]))
        rates = " | ".join(_fmt(r["behaviour"].get(n)) for n in names)
        lines.append(f"| {r['name']} | {r['step']} | {rates} | {_fmt(r.get('probe_pass_rate'))} | "
                     f"{_fmt(r.get('kl_to_reference'))} | {_fmt(r['progress'])} | {result} |")
    return _section("Checkpoints", *lines)


# How report.md names each reason a snapshot's row is not trained on (data.DROP_REASONS).
_DROPPED = {
    "other_tenants": "other tenants' rows",
    "superseded": "replaced by the same judge's later answer",
    "tenant_share": "over the tenant share (max_tenant_share)",
    "tie": "ties",
    "both_bad": "both bad",
    "other_label": "other labels",
    "cut": "an answer cut at the token limit (cut_answers: {cut_answers})",
    "balance": "the per-prompt cap (max_pairs_per_prompt: {max_pairs_per_prompt})",
}


def training_data_markdown(summary: dict[str, Any]) -> list[str]:
    """What of the snapshot was trained on, why the rest was not, and how chosen and rejected
    answers differ in length (data.training_rows)."""
    lines = [*_table("pairs", "count"), f"| in the snapshot | {summary['snapshot_pairs']} |"]
    for reason, count in summary["dropped"].items():
        if count:
            label = _DROPPED.get(reason, reason).format(**summary)
            lines.append(f"| left out: {label} | {count} |")
    lines.append(f"| **trained on** | **{summary['trained_pairs']}** |")
    cut = summary["cut_in_trained"]
    lines += [
        "",
        f"Prompts: {summary['prompts']}, at most {summary['most_pairs_of_a_prompt']} pairs of one. Answers cut at the "
        f"token limit among the pairs trained on: {cut['chosen']} chosen, {cut['rejected']} rejected; "
        f"{cut['unknown']} pairs whose answers did not say.",
    ]
    diff = summary["length_difference"]
    if diff["pairs"]:
        lines += [
            "",
            f"Length of the chosen answer minus the rejected one, in {diff['unit']}: mean {_fmt(diff['mean'])}, "
            f"median {_fmt(diff['median'])}, quartiles {_fmt(diff['q1'])} and {_fmt(diff['q3'])}; the chosen "
            f"answer is the longer one in {diff['chosen_longer_share']:.0%} of pairs.",
        ]
        if diff.get("skew"):
            lines += ["", f"**Length skew:** {diff['skew']}."]
    return _section("Training data", *lines)


def side_by_side(run_dir: Path) -> dict[str, Any] | None:
    """Held-out answers and probes before and after, each with the checks it passed or failed;
    None until both evaluations exist."""
    from tuneloop.trainer import criteria as cr

    paths = [run_dir / "eval_before.json", run_dir / "eval_after.json"]
    if not all(p.is_file() for p in paths):
        return None
    before, after = (json.loads(p.read_text()) for p in paths)
    spec = cr.load_criteria(run_dir / "criteria.yaml")

    def checks(text: str) -> list[dict[str, Any]]:
        return [{"name": f"behaviour:{c.name}", "passed": cr.check_passes(c, text)} for c in spec.behaviour]

    held_out = [
        {
            "prompt": b["prompt"],
            "before": {"output": b["output"], "reward": b.get("reward"), "checks": checks(b["output"])},
            "after": {"output": a["output"], "reward": a.get("reward"), "checks": checks(a["output"])},
        }
        for b, a in zip(before["held_out"], after["held_out"], strict=True)
    ]
    probes = [
        {
            "prompt": b["prompt"],
            "expect": b["expect"],
            "before": {"output": b["output"], "checks": [{"name": "probes", "passed": b["passed"]}]},
            "after": {"output": a["output"], "checks": [{"name": "probes", "passed": a["passed"]}]},
        }
        for b, a in zip(before.get("probes", []), after.get("probes", []), strict=True)
    ]
    return {"held_out": held_out, "probes": probes}


# Answers are shown as the model wrote them: HTML in an answer must not render, and a pipe, a
# backtick or a backslash must not end the cell, open a code span that swallows the line
# breaks, or vanish as an escape.
_LITERAL = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;", "\\": "\\\\", "|": "\\|", "`": "\\`"})
_INDENT = re.compile(r"^ +", re.MULTILINE)


def _cell(text: str) -> str:
    """Text as one Markdown table cell, whole: line breaks and indentation kept visible."""
    text = text.replace("\r\n", "\n").strip() or "(empty)"
    text = _INDENT.sub(lambda m: "&nbsp;" * len(m.group()), text.translate(_LITERAL))
    return text.replace("\n", "<br>")


def _marks(answer: dict[str, Any]) -> str:
    marks = [("✓ " if c["passed"] else "✗ ") + c["name"] for c in answer["checks"]]
    if answer.get("reward") is not None:
        marks.append(f"reward {_fmt(answer['reward'])}")
    return ", ".join(marks) or "-"


def _tally(rows: list[dict[str, Any]], side: str) -> str:
    return f"{sum(all(c['passed'] for c in r[side]['checks']) for r in rows)} of {len(rows)}"


def answers_markdown(answers: dict[str, Any]) -> list[str]:
    """The held-out answers and the probes, parent and candidate in one row per prompt, each
    answer followed by the checks it passed (✓) or failed (✗)."""
    lines: list[str] = []
    for title, rows, what in (
        ("Held-out answers", answers["held_out"], "Passing every behaviour check"),
        ("Probes", answers["probes"], "Right"),
    ):
        if not rows:
            continue
        body = [
            f"{what}: parent {_tally(rows, 'before')}, candidate {_tally(rows, 'after')}. Greedy answers, in full.",
            "",
            *_table("prompt", "parent", "candidate"),
        ]
        for r in rows:
            prompt = _cell(r["prompt"]) + (f"<br>expects: {_cell(r['expect'])}" if "expect" in r else "")
            body.append(
                f"| {prompt} | {_cell(r['before']['output'])}<br>{_marks(r['before'])} "
                f"| {_cell(r['after']['output'])}<br>{_marks(r['after'])} |"
            )
        lines += _section(f"{title}: parent vs candidate", *body)
    return lines


def _section(title: str, *body: str) -> list[str]:
    return [f"## {title}", "", *body, ""]


def _table(*columns: str) -> list[str]:
    return ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]


def _outcome(check: dict[str, Any]) -> str:
    return "skipped" if check.get("skipped") else "pass" if check["passed"] else "FAIL"


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# Retrain run {report['run_id']}",
        "",
        f"- status: **{report['status']}**" + (f" — {report['reason']}" if report.get("reason") else ""),
        f"- parent: {_fmt(report.get('parent'))}",
        f"- candidate: {_fmt(report.get('candidate'))}",
        f"- algorithm: {report.get('algorithm')}",
        f"- data: {_fmt((report.get('data') or {}).get('source'))} ({_fmt((report.get('data') or {}).get('rows'))} rows)",
        f"- criteria: {report.get('criteria_name')} (sha256 {str(report.get('criteria_sha256'))[:12]})",
        "",
    ]
    gates = report.get("gates")
    if gates:
        lines += _section(
            "Gates",
            *_table("gate", "value", "bar", "result"),
            *(f"| {g['name']} | {_fmt(g.get('value'))} | {_fmt(g.get('bar'))} | {_outcome(g)} |" for g in gates["checks"]),
        )
    if report.get("training_data"):
        lines += training_data_markdown(report["training_data"])
    rm = report.get("reward_model")
    if rm:
        lines += _section(
            "Reward model",
            f"{rm.get('ref')}: promoted={rm.get('promoted')}"
            + (f", refused: {rm['refused_reason']}" if rm.get("refused_reason") else ""),
        )
    train = report.get("train")
    if train:
        flags = [f"- watch flag at step {f['step']}: **{f['flag']}** — {f['detail']}" for f in train.get("watch_flags") or []]
        lines += _section(
            "Training",
            f"{train['stage']}: {train['steps']} steps in {train['seconds']} s, mean loss {_fmt(train.get('train_loss'))}"
            + (f" (resumed from {Path(train['resumed_from']).name})" if train.get("resumed_from") else ""),
            *(["", *flags] if flags else []),
        )
        if report.get("plots", {}).get("training"):
            lines += [f"![training]({TRAINING_PLOT})", ""]
    if report.get("checkpoints"):
        lines += checkpoints_markdown(report["checkpoints"])
        if report.get("plots", {}).get("checkpoints"):
            lines += [f"![checkpoints]({CHECKPOINTS_PLOT})", ""]
    verdict = report.get("verdict")
    if verdict:
        lines += _section(
            "Criteria",
            *_table("criterion", "parent", "candidate", "required", "result", "reason"),
            *(
                f"| {c['name']} | {_fmt(c.get('before'))} | {_fmt(c.get('after'))} | {c.get('threshold', '')} | "
                f"{_outcome(c)} | {_cell(str(c.get('reason', '')))} |"
                for c in verdict["criteria"]
            ),
        )
        if report.get("plots", {}).get("criteria"):
            lines += [f"![criteria]({CRITERIA_PLOT})", ""]
    if report.get("answers"):
        lines += answers_markdown(report["answers"])
    if report.get("error"):
        lines += _section("Error", "```", str(report["error"]), "```")
    return "\n".join(lines)


def write_report(run_dir: Path, report: dict[str, Any]) -> dict[str, Any]:
    """Writes report.json, report.md and the plots; a plotting failure does not lose the report."""
    plots: dict[str, str] = {}
    try:
        rows = read_metrics(run_dir / "train")
        if plot_training(rows, run_dir / TRAINING_PLOT):
            plots["training"] = TRAINING_PLOT
        if report.get("verdict") and plot_criteria(report["verdict"], run_dir / CRITERIA_PLOT):
            plots["criteria"] = CRITERIA_PLOT
        if report.get("checkpoints") and plot_checkpoints(report["checkpoints"], run_dir / CHECKPOINTS_PLOT):
            plots["checkpoints"] = CHECKPOINTS_PLOT
    except Exception:  # noqa: BLE001 - the text report matters more than a picture
        log.exception("plotting the report failed")
    report = {**report, "plots": plots}
    (run_dir / "report.json").write_text(json.dumps(report, indent=2, default=str))
    answers = None
    try:
        answers = side_by_side(run_dir)
    except Exception:  # noqa: BLE001 - as with the plots: the verdict matters more
        log.exception("pairing the answers for the report failed")
    if answers is not None:
        (run_dir / ANSWERS_FILE).write_text(json.dumps(answers, indent=2))
    (run_dir / "report.md").write_text(markdown({**report, "answers": answers}))
    return report
