"""`tuneloop store`: migrate an old-format store, erase a tenant or user, compact, vacuum,
show the tables. The work is in migrate.py and admin.py; imported inside the commands so
that `tuneloop --help` does not load delta-rs."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

import typer

from tuneloop.store.report import Root, store_root

cli = typer.Typer(help="The preference store's tables: migration, erasure, upkeep.", no_args_is_help=True)


@contextmanager
def _reported() -> Iterator[None]:
    """A command's expected failures (a bad root, a table delta-rs refuses) as one line on
    stderr and exit status 1, not a traceback."""
    from deltalake.exceptions import DeltaError

    from tuneloop.store.admin import AdminError
    from tuneloop.store.migrate import MigrationError

    try:
        yield
    except (AdminError, MigrationError, DeltaError, ValueError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None


@cli.command("migrate")
def migrate_cmd(
    source: Annotated[str, typer.Argument(help="Folder of the old-format store (index.sqlite, rows/, judgements/).")],
    to: Annotated[
        str | None,
        typer.Option("--to", help="Root to write the tables under (default: TUNELOOP_STORE_ROOT); may be SOURCE."),
    ] = None,
    completions_topic: Annotated[
        str | None, typer.Option(help="The completions topic the old store read (default: tuneloop.completions.v1).")
    ] = None,
) -> None:
    """Copy an old-format store into the Delta tables, in one commit per table, and verify it."""
    from tuneloop.store.migrate import migrate

    options = {"completions_topic": completions_topic} if completions_topic else {}
    with _reported():
        report = migrate(source, store_root(to), **options)
    typer.echo(report.summary())


@cli.command("erase")
def erase_cmd(
    tenant: Annotated[str, typer.Option(help="The tenant whose data goes (all of it, unless --user).")],
    user: Annotated[
        str | None, typer.Option(help="Only this end user's / annotator's judgements and pairs (annotator_id).")
    ] = None,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
    root: Root = None,
) -> None:
    """Delete a tenant's or a user's data and every file that held it; older versions become unreadable."""
    from tuneloop.store.admin import erase

    root = store_root(root)
    who = f"user {user!r} of tenant {tenant!r}" if user else f"everything of tenant {tenant!r}"
    if not yes:
        typer.confirm(f"Erase {who} from {root}? Versions before the erasure become unreadable.", abort=True)
    with _reported():
        done = erase(root, tenant, user)
    counts = ", ".join(f"{name} {n}" for name, n in done.deleted.items())
    typer.echo(f"erased {who}: rows deleted: {counts}")
    typer.echo(f"recorded in {done.log}" if done.log else "object-store root: keep this record:")
    typer.echo(json.dumps(done.record(), sort_keys=True))


@cli.command("compact")
def compact_cmd(root: Root = None) -> None:
    """Merge each table's small files into larger ones (rows and versions unchanged)."""
    from tuneloop.store.admin import compact

    with _reported():
        done = compact(store_root(root))
    for name, metrics in done.items():
        typer.echo(f"{name}: {metrics.get('numFilesRemoved', 0)} files -> {metrics.get('numFilesAdded', 0)}")


@cli.command("vacuum")
def vacuum_cmd(
    retention_hours: Annotated[
        int | None, typer.Option(min=0, help="Keep files younger than this (default: the tables' 7 days).")
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only list what would be deleted.")] = False,
    root: Root = None,
) -> None:
    """Delete files no recent version needs: replaced, change-data, and never-committed files."""
    from tuneloop.store.admin import vacuum

    with _reported():
        done = vacuum(store_root(root), retention_hours, dry_run)
    verb = "would delete" if dry_run else "deleted"
    for name, files in done.items():
        typer.echo(f"{name}: {verb} {len(files)} files")


@cli.command("cleanup-metadata")
def cleanup_metadata_cmd(root: Root = None) -> None:
    """Delete log files older than the tables' log retention (30 days); time travel ends there."""
    from tuneloop.store.admin import cleanup_metadata

    with _reported():
        done = cleanup_metadata(store_root(root))
    for name, removed in done.items():
        typer.echo(f"{name}: deleted {removed} log files")


@cli.command("versions")
def versions_cmd(root: Root = None) -> None:
    """Each table's newest version and row count."""
    from tuneloop.store.admin import sizes

    with _reported():
        done = sizes(store_root(root))
    for name, (version, rows) in done.items():
        typer.echo(f"{name}: version {version}, {rows} rows" if version >= 0 else f"{name}: no table")
