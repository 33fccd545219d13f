"""Run every benchmark (bench/bench_*.py), one subprocess each with a timeout, and gather
their ratios and absolute figures into one table and bench/results.json.

    .venv/bin/python bench/run_all.py [--timeout 1800] [--only gateway kafka]
                                      [--args gateway="--requests 50"] [--out bench/results.json]

Results are read, in this order, from: the file given to a benchmark as `--json PATH` (when
its source mentions `--json`), the last line of its stdout when that is a JSON object, or
its printed `ratio NAME: VALUE` lines.
A benchmark that fails, times out or prints nothing readable shows as such in the table; the
others still run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

BENCH_DIR = Path(__file__).resolve().parent
TAIL_CHARS = 4000
STOP_GRACE_S = 60.0
Ratio = dict[str, Any]


def parse_ratio_lines(stdout: str) -> dict[str, Any] | None:
    """Any benchmark's `ratio NAME: VALUE` lines, for one that prints no JSON."""
    found = re.findall(r"^ratio ([^:\n]+):\s*([-+\d.eE]+)\s*$", stdout, re.MULTILINE)
    return {"ratios": [{"name": name.strip(), "value": float(v)} for name, v in found]} if found else None


def last_json_line(stdout: str) -> dict[str, Any] | None:
    lines = [line for line in stdout.splitlines() if line.strip()]
    if not lines:
        return None
    try:
        value = json.loads(lines[-1])
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def ratios_of(result: dict[str, Any]) -> list[Ratio]:
    """A result's ratios: its `ratios` list, else every numeric field named *ratio*, with the
    numbers beside it, and the table of figures it was computed from (a sibling object holding
    a key named like the ratio, e.g. `batched_ratio` next to `pairs_per_s.batched`), as its
    absolute figures."""
    if isinstance(result.get("ratios"), list):
        return [r for r in result["ratios"] if isinstance(r, dict) and isinstance(r.get("value"), int | float)]
    found: list[Ratio] = []

    def numbers(node: dict[str, Any]) -> dict[str, float]:
        return {k: v for k, v in node.items() if isinstance(v, int | float) and not isinstance(v, bool)}

    def walk(node: dict[str, Any], path: str) -> None:
        here = numbers(node)
        for key, value in here.items():
            if "ratio" not in key.lower():
                continue
            stem = re.sub(r"_?ratio$", "", key, flags=re.IGNORECASE)
            parts = [
                f"{name}: " + ", ".join(f"{k}={v:.4g}" for k, v in numbers(table).items())
                for name, table in node.items()
                if isinstance(table, dict) and stem in table and numbers(table)
            ]
            parts.append(", ".join(f"{k}={v:g}" for k, v in here.items() if "ratio" not in k.lower()))
            found.append({"name": f"{path}{key}", "value": value, "figures": "; ".join(p for p in parts if p)})
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{path}{key}.")

    walk(result, "")
    return found


def supports_json_flag(script: Path) -> bool:
    return "--json" in script.read_text()


def run_one(script: Path, timeout_s: float, extra: list[str]) -> dict[str, Any]:
    name = script.stem.removeprefix("bench_")
    entry: dict[str, Any] = {"script": str(script.relative_to(BENCH_DIR.parent)), "args": extra}
    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmp:
        json_path = Path(tmp) / "result.json"
        cmd = [sys.executable, str(script), *extra]
        if supports_json_flag(script):
            cmd += ["--json", str(json_path)]
        started = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=BENCH_DIR.parent,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            stdout, stderr = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            stdout, stderr = stop(proc)
            entry.update(status="timeout", seconds=round(time.monotonic() - started, 1),
                         error=f"no result within {timeout_s:.0f} s",
                         stdout_tail=stdout[-TAIL_CHARS:], stderr_tail=stderr[-TAIL_CHARS:])
            return entry
        entry.update(seconds=round(time.monotonic() - started, 1), returncode=proc.returncode,
                     stdout_tail=stdout[-TAIL_CHARS:], stderr_tail=stderr[-TAIL_CHARS:])
        if proc.returncode != 0:
            last = (stderr.strip().splitlines() or ["(no output)"])[-1]
            entry.update(status="failed", error=f"exit code {proc.returncode}: {last}")
            return entry
        result, source = None, None
        if json_path.is_file():
            result, source = json.loads(json_path.read_text()), "--json file"
        if result is None and (result := last_json_line(stdout)) is not None:
            source = "last stdout line"
        if result is None and (result := parse_ratio_lines(stdout)) is not None:
            source = "ratio lines of the text output (no machine-readable output)"
    if result is None:
        entry.update(status="unreadable", error="finished, but printed no JSON and no ratio lines")
        return entry
    entry.update(status="ok", result_source=source, result=result, ratios=ratios_of(result))
    return entry


def stop(proc: subprocess.Popen[str]) -> tuple[str, str]:
    """Interrupt a benchmark that ran out of time; SIGKILL it if it does not end.

    SIGINT first: it raises KeyboardInterrupt, so the benchmark's context managers stop the
    services and brokers it started (SIGKILL would leave them running).
    """
    proc.send_signal(signal.SIGINT)
    try:
        return proc.communicate(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.communicate()


def figures(ratio: Ratio) -> str:
    if "numerator" in ratio and "denominator" in ratio:
        return f"{ratio['numerator']} / {ratio['denominator']}"
    return str(ratio.get("figures", ""))


def render(results: dict[str, dict[str, Any]]) -> Table:
    table = Table(title="tuneloop benchmarks")
    for column, justify in (("benchmark", "left"), ("ratio", "left"), ("value", "right"),
                            ("absolute figures", "left"), ("status", "left"), ("s", "right")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for name, entry in results.items():
        seconds = f"{entry.get('seconds', 0):.0f}"
        if entry["status"] != "ok":
            table.add_row(name, "-", "-", entry.get("error", ""), f"[red]{entry['status']}[/red]", seconds)
            continue
        if not entry["ratios"]:
            table.add_row(name, "(no ratios)", "-", "", "ok", seconds)
        for i, ratio in enumerate(entry["ratios"]):
            status = "ok" if entry["result_source"] in ("--json file", "last stdout line") else "ok (parsed text)"
            table.add_row(name if i == 0 else "", ratio["name"], f"{ratio['value']:.3f}", figures(ratio),
                          status if i == 0 else "", seconds if i == 0 else "")
    return table


def write_report(out: Path, results: dict[str, dict[str, Any]], *, complete: bool) -> None:
    report = {
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "complete": complete,
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                    "load_average": os.getloadavg()},
        "benchmarks": results,
    }
    out.write_text(json.dumps(report, indent=2) + "\n")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=1800, help="seconds each benchmark may take")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run these benchmarks only (bench_NAME.py)")
    parser.add_argument("--args", action="append", default=[], metavar='NAME="ARGS"',
                        help="extra arguments for one benchmark, e.g. gateway=\"--requests 50\"")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results.json", help="where to write the results")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    extra: dict[str, list[str]] = {}
    for item in args.args:
        name, sep, rest = item.partition("=")
        if not sep:
            raise SystemExit(f"--args {item!r}: expected NAME=\"ARGS\"")
        extra[name.strip()] = shlex.split(rest)
    scripts = sorted(BENCH_DIR.glob("bench_*.py"))
    if args.only:
        scripts = [s for s in scripts if s.stem.removeprefix("bench_") in args.only]
        missing = set(args.only) - {s.stem.removeprefix("bench_") for s in scripts}
        if missing:
            raise SystemExit(f"no benchmark named {sorted(missing)} in {BENCH_DIR}")
    console = Console(stderr=True)
    results: dict[str, dict[str, Any]] = {}
    for script in scripts:
        name = script.stem.removeprefix("bench_")
        console.print(f"running {script.name} (timeout {args.timeout:.0f} s) ...")
        results[name] = run_one(script, args.timeout, extra.get(name, []))
        console.print(f"  {results[name]['status']} in {results[name].get('seconds', 0):.0f} s")
        # Written after each benchmark: a run stopped part way keeps what it measured.
        write_report(args.out, results, complete=len(results) == len(scripts))
    out = Console(width=max(Console().width, 150))
    out.print(render(results))
    out.print(f"results: {args.out}")


if __name__ == "__main__":
    main()
