"""The `tuneloop` command: one entrypoint for every service, stage and tool.

Implementations are imported inside the commands so `tuneloop --help` stays fast and an
image only loads what it runs.
"""

from __future__ import annotations

import importlib
from enum import Enum
from typing import Annotated, Optional

import typer

from tuneloop.demo_behaviours import BEHAVIOURS

app = typer.Typer(help="tuneloop: preferences in, a better model out.", no_args_is_help=True)
serve = typer.Typer(help="Run one service (the entrypoint of its Deployment).", no_args_is_help=True)
app.add_typer(serve, name="serve")

Port = Annotated[Optional[int], typer.Option(help="Service port (default from settings).")]
MetricsPort = Annotated[Optional[int], typer.Option(help="Prometheus /metrics port (default from settings).")]
Model = Annotated[
    Optional[str],
    typer.Option(help="A model folder or a registry reference such as policy@production."),
]


def _mount(module: str, name: str, help: str) -> None:
    """Mounts the typer app `cli` of `module` as `tuneloop <name>`."""
    try:
        sub = importlib.import_module(module).cli
    except ModuleNotFoundError as err:  # a part not present in this image
        if not (err.name or "").startswith("tuneloop"):
            raise
        return
    app.add_typer(sub, name=name, help=help)


@serve.command("generation")
def serve_generation(port: Port = None, metrics_port: MetricsPort = None, model: Model = None) -> None:
    """gRPC Generation: serves the policy, logs every completion to Kafka."""
    from tuneloop.generation.server import main

    main(port=port, metrics_port=metrics_port, model=model)


@serve.command("reward")
def serve_reward(port: Port = None, metrics_port: MetricsPort = None, model: Model = None) -> None:
    """gRPC Reward: scores (prompt, response) pairs with the promoted reward model."""
    from tuneloop.reward.server import main

    main(port=port, metrics_port=metrics_port, model=model)


@serve.command("feedback")
def serve_feedback(port: Port = None, metrics_port: MetricsPort = None) -> None:
    """gRPC Feedback: validates feedback events and writes them to Kafka."""
    from tuneloop.feedback.server import main

    main(port=port, metrics_port=metrics_port)


@serve.command("store")
def serve_store(port: Port = None, metrics_port: MetricsPort = None) -> None:
    """Preference store: joins feedback and completions into Delta tables, measures agreement."""
    from tuneloop.store.consumer import main

    main(port=port, metrics_port=metrics_port)


@serve.command("gateway")
def serve_gateway(port: Port = None, metrics_port: MetricsPort = None) -> None:
    """HTTP gateway: OpenAI-compatible API, feedback, API keys, the workbench."""
    from tuneloop.gateway.app import main

    main(port=port, metrics_port=metrics_port)


_mount("tuneloop.trainer.cli", "train", "Run a training stage (the trainer Job's entrypoint).")
_mount("tuneloop.common.local_kafka", "kafka", "A local Apache Kafka broker (KRaft) for dev and tests.")
_mount("tuneloop.common.models_cli", "models", "Make, import and manage model versions.")
_mount("tuneloop.store.report", "feedback", "Feedback and annotation-quality reports.")
_mount("tuneloop.store.admin_cli", "store", "The preference store's tables: migration, erasure, upkeep.")
_mount("tuneloop.trainer.jobs", "jobs", "Retrain runs on Kubernetes.")


DemoBehaviour = Enum("DemoBehaviour", {name: name for name in BEHAVIOURS}, type=str)


@app.command("demo")
def demo(
    behaviour: Annotated[DemoBehaviour, typer.Option(help="What the feedback asks for: " + "; ".join(
        f"{b.name}: {b.declared}" for b in BEHAVIOURS.values()))] = DemoBehaviour.tldr,
) -> None:
    """The whole loop on local defaults: Kafka, every service, feedback, a retrain, promotion."""
    from tuneloop.demo import main

    main(behaviour.value)


if __name__ == "__main__":
    app()
