"""`tuneloop feedback`: annotation-quality reports and dataset export from the preference store."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from tuneloop.store import agreement, read

cli = typer.Typer(help="Feedback and annotation-quality reports.", no_args_is_help=True)

Root = Annotated[
    str | None, typer.Option(help="Store root, a folder or URL (default: TUNELOOP_STORE_ROOT or .tuneloop/store).")
]


def store_root(root: str | None) -> str:
    if root is not None:
        return root
    from tuneloop.common.settings import SettingsError, load_settings
    from tuneloop.store.settings import StoreSettings

    try:
        return load_settings(StoreSettings).root
    except SettingsError as err:
        raise typer.BadParameter(str(err)) from None


def _fmt(value: float) -> str:
    return "—" if math.isnan(value) else f"{value:.3f}"


def _json_value(value: object) -> object:
    # JSON has no NaN: an undefined figure is null.
    return None if isinstance(value, float) and math.isnan(value) else value


@cli.command("report")
def report_cmd(
    tenant: Annotated[str, typer.Option(help="The tenant whose annotators are measured.")],
    root: Root = None,
    project: Annotated[str, typer.Option(help="Only this project ('' = all of the tenant's).")] = "",
    calibration_only: Annotated[bool, typer.Option(help="Only calibration items.")] = False,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the report as JSON here.")] = None,
    csv_out: Annotated[Path | None, typer.Option("--csv", help="Write the per-annotator table as CSV here.")] = None,
) -> None:
    """Agreement between annotators and each annotator's anchor accuracy (drift)."""
    measured = agreement.measure_store(store_root(root), tenant, project, calibration_only)
    console = Console()
    console.print(
        f"items judged by ≥2 annotators: {measured.items}   judgements: {measured.judgements}   "
        f"annotators: {measured.annotator_count}"
    )
    console.print(
        f"percent agreement: {_fmt(measured.percent_agreement)}   "
        f"kappa ({measured.kappa_method or 'n/a'}): {_fmt(measured.kappa)}"
    )
    table = Table("annotator", "anchors", "anchor accuracy", "recent accuracy", "majority agreement")
    for q in measured.annotators:
        table.add_row(
            q.annotator_id,
            str(q.anchors),
            _fmt(q.anchor_accuracy),
            _fmt(q.recent_anchor_accuracy),
            _fmt(q.majority_agreement),
        )
    console.print(table)
    rows = [{k: _json_value(v) for k, v in asdict(q).items()} for q in measured.annotators]
    if json_out is not None:
        summary = {k: _json_value(v) for k, v in asdict(measured).items() if k != "annotators"}
        json_out.write_text(json.dumps({**summary, "annotators": rows}, indent=2) + "\n")
    if csv_out is not None:
        with csv_out.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(agreement.AnnotatorQuality.__dataclass_fields__))
            writer.writeheader()
            writer.writerows(rows)


@cli.command("snapshot")
def snapshot_cmd(root: Root = None) -> None:
    """Print the id of the store's current snapshot (a version of the pairs table)."""
    typer.echo(read.current_snapshot(store_root(root)).id)


@cli.command("export")
def export_cmd(
    out: Annotated[Path, typer.Option(help="Folder to write the dataset to (datasets' save_to_disk).")],
    snapshot_ref: Annotated[
        str, typer.Option("--snapshot", help="A snapshot id (pairs@<version>) or 'current'.")
    ] = "current",
    root: Root = None,
    tie_policy: Annotated[str, typer.Option(help="Ties: drop, or keep with label=tie.")] = "drop",
    both_bad_policy: Annotated[str, typer.Option(help="Both-bad pairs: drop, or keep with label=both_bad.")] = "drop",
) -> None:
    """Export the rows at a snapshot as a TRL preference dataset."""
    root = store_root(root)
    try:
        version = read.versions(root)["pairs"] if snapshot_ref == "current" else read.parse_snapshot(snapshot_ref)
        rows = read.load_rows(root, version)
        dataset = read.to_trl_dataset(rows, tie_policy, both_bad_policy)  # type: ignore[arg-type]
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    dataset.save_to_disk(str(out))
    ident = read.snapshot_id(version)
    (out / "snapshot.json").write_text(
        json.dumps({"snapshot": ident, "version": version, "rows": len(rows), "examples": len(dataset)}, indent=2)
        + "\n"
    )
    typer.echo(f"{ident}: {len(dataset)} examples ({len(rows)} rows) -> {out}")
