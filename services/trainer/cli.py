"""`tuneloop train`: one command per stage (algorithms.py), each `--config FILE.yaml` plus
`--set key=value`; `retrain` runs the scheduled pipeline.

Exit codes: 0 done (for `retrain`: promoted, or refused by a gate or a criterion — the
printed outcome's `status` says which), 1 an error during the run, 2 an invalid config.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from tuneloop.trainer import algorithms
from tuneloop.trainer.config import ConfigError, load_config

cli = typer.Typer(help="Training stages and the scheduled retrain pipeline.", no_args_is_help=True)
log = logging.getLogger(__name__)

ConfigFile = Annotated[Path | None, typer.Option("--config", "-c", help="Stage config (YAML).")]
Sets = Annotated[
    list[str] | None, typer.Option("--set", "-s", help="Override a field: key=value (dotted keys for nested fields).")
]
Resume = Annotated[bool, typer.Option("--resume", help="Continue from the last checkpoint in output_dir.")]


@contextmanager
def _errors() -> Iterator[None]:
    from tuneloop.common.logs import configure_logging

    configure_logging("trainer")
    _quiet_progress_bars()
    try:
        _apply_settings()
        yield
    except ConfigError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    except typer.Exit:
        raise
    except Exception as err:  # noqa: BLE001 - a Job's log must say why it failed, then exit non-zero
        log.exception("stage failed")
        typer.echo(f"error: {type(err).__name__}: {err}", err=True)
        raise typer.Exit(1) from None


def _quiet_progress_bars() -> None:
    """A Job's log is JSON lines; tqdm bars from loading weights and mapping datasets are noise."""
    import datasets
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()


def _apply_settings() -> None:
    import torch

    from tuneloop.common.settings import SettingsError, load_settings
    from tuneloop.trainer.config import TrainerSettings

    try:
        settings = load_settings(TrainerSettings)
    except SettingsError as err:
        raise ConfigError(str(err)) from None
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)


def _print(result: Any) -> None:
    typer.echo(json.dumps(result if isinstance(result, dict) else result.to_json(), default=str))


def _run_stage(algorithm: algorithms.Algorithm, config: Path | None, sets: list[str] | None, resume: bool) -> None:
    from tuneloop.trainer.distributed import is_main_process

    with _errors():
        result = algorithm.run_stage(load_config(algorithm.config, config, sets), resume)
        if is_main_process():  # one outcome line, not one per training process
            _print(result)


def _stage_command(algorithm: algorithms.Algorithm) -> None:
    if algorithm.resumable:

        def command(config: ConfigFile = None, set_: Sets = None, resume: Resume = False) -> None:
            _run_stage(algorithm, config, set_, resume)

    else:

        def command(config: ConfigFile = None, set_: Sets = None) -> None:  # type: ignore[misc]
            _run_stage(algorithm, config, set_, False)

    command.__doc__ = algorithm.help
    cli.command(algorithm.name, help=algorithm.help)(command)


for _algorithm in algorithms.ALGORITHMS.values():
    _stage_command(_algorithm)


@cli.command("evaluate")
def evaluate_cmd(
    model: Annotated[str, typer.Option(help="Model folder or registry ref to evaluate.")],
    criteria: Annotated[Path, typer.Option(help="Criteria file (YAML).")],
    baseline: Annotated[str | None, typer.Option(help="Compare against this model (the parent).")] = None,
    out: Annotated[Path | None, typer.Option(help="Write the results (and verdict) as JSON here.")] = None,
) -> None:
    """Evaluate a model on a criteria file; with --baseline, print the verdict too."""
    from tuneloop.trainer.criteria import compare, load_criteria
    from tuneloop.trainer.evaluate import evaluate
    from tuneloop.trainer.modeling import resolve

    with _errors():
        spec = load_criteria(criteria)
        after = evaluate(resolve(model), spec, reference_dir=resolve(baseline) if baseline else None)
        result: dict[str, Any] = {"after": after}
        if baseline:
            result["before"] = evaluate(resolve(baseline), spec)
            result["verdict"] = compare(result["before"], after, spec).model_dump()
        if out:
            out.write_text(json.dumps(result, indent=2))
        _print(result.get("verdict") or {"behaviour": after["behaviour"], "probe_pass_rate": after["probe_pass_rate"]})


@cli.command("retrain")
def retrain(
    config: ConfigFile = None,
    set_: Sets = None,
    resume: Annotated[Path | None, typer.Option("--resume", help="Continue the run in this run folder.")] = None,
) -> None:
    """The scheduled pipeline: snapshot, gates, reward model?, train, evaluate, register, promote or refuse.

    Prints the outcome as one JSON line; exit code 0 for "promoted" and "refused".
    """
    from tuneloop.trainer.retrain import RetrainConfig, run_retrain

    with _errors():
        if resume is not None:
            if config is not None or set_:
                raise ConfigError("--resume continues with the run's own config; drop --config/--set")
            _print(run_retrain(resume=resume))
        else:
            _print(run_retrain(load_config(RetrainConfig, config, set_)))


@cli.command("retrain-stage", hidden=True)
def retrain_stage(run_dir: Annotated[Path, typer.Argument(help="The run folder retrain made.")]) -> None:
    """The training stage of a retrain run, in each process torchrun starts (retrain starts it).

    Prints nothing: retrain's own outcome stays the one line on stdout; rank 0's stage.json
    is the result retrain reads."""
    from tuneloop.trainer.retrain import train_stage

    with _errors():
        train_stage(run_dir)


if __name__ == "__main__":
    sys.exit(cli())
