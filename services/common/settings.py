"""Typed settings shared by every service: one class per service or stage, env prefix
`TUNELOOP_`, and a start-up failure that names the offending field.

The serving fields (where a service listens, its metrics port, log level, how many calls it
runs and how long it drains) are declared once, in `ServiceSettings` and
`GrpcServiceSettings`; each service's settings class extends one of them with its own env
prefix (TUNELOOP_<SERVICE>_) and overrides the defaults that differ, e.g.
`port: ListenPort = 50051`. The `Annotated` types below carry the bounds and the
description, so an override changes the default only.
"""

from __future__ import annotations

import sys
from typing import Annotated, Literal, TypeVar

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

S = TypeVar("S", bound=BaseSettings)

ListenPort = Annotated[
    int, Field(ge=0, le=65535, description="Port of the service's API: gRPC, HTTP for the gateway (0 picks a free one).")
]
MetricsPort = Annotated[
    int | None,
    Field(ge=0, le=65535, description="Prometheus /metrics port (0 picks a free one); unset: no /metrics at all."),
]
HandlerThreads = Annotated[int, Field(ge=2, le=1024, description="gRPC handler threads (one per open call).")]
OpenCalls = Annotated[
    int | None,
    Field(
        ge=2,
        description="Open gRPC calls (health checks included) beyond which new ones get RESOURCE_EXHAUSTED "
        "(HTTP 429 at the gateway) instead of waiting in an unbounded queue for a handler thread; "
        "unset: no bound.",
    ),
]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]


class SettingsError(ValueError):
    """Invalid configuration; the message names each bad field and its env variable."""


class ServiceSettings(BaseSettings):
    """What every long-running service is served with; subclasses set `env_prefix`."""

    model_config = SettingsConfigDict(extra="ignore")

    host: str = Field("0.0.0.0", description="Address the service's API and metrics servers bind to.")
    port: ListenPort = 0
    metrics_port: MetricsPort = None
    log_level: LogLevel = Field("INFO", description="Log level (DEBUG, INFO, WARNING, ERROR, CRITICAL).")
    grace_seconds: float = Field(20.0, ge=0, description="On SIGTERM, how long in-flight calls may still finish.")

    @field_validator("log_level", mode="before")
    @classmethod
    def _level_in_capitals(cls, value: object) -> object:
        # `logging` takes either case; a typo still fails at start.
        return value.upper() if isinstance(value, str) else value


class GrpcServiceSettings(ServiceSettings):
    """A gRPC service's serving fields (`tuneloop.common.grpc_server.GrpcServer`)."""

    max_workers: HandlerThreads = 32
    max_open_calls: OpenCalls = None


class ModelServingSettings(GrpcServiceSettings):
    """A gRPC service that serves a registry model and follows its alias
    (`tuneloop.common.alias_follower`): Generation and Reward."""

    alias_poll_s: float = Field(
        2.0, gt=0, description="How often the registry alias is read; a move loads the new version and swaps it in."
    )
    alias_events: bool = Field(
        True,
        description="Also consume tuneloop.models.v1 to swap at once on a promotion or rollback (polling stays "
        "on); only where Kafka is configured (TUNELOOP_KAFKA_BOOTSTRAP_SERVERS set).",
    )


def load_settings(cls: type[S], **overrides: object) -> S:
    """Build `cls` from the environment plus explicit overrides (CLI flags win).

    Overrides that are None are ignored so optional CLI flags fall through to the env.
    """
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return cls(**given)
    except ValidationError as err:
        prefix = str(cls.model_config.get("env_prefix", ""))
        problems = []
        for e in err.errors():
            field = ".".join(str(p) for p in e["loc"]) or "?"
            env = (prefix + str(e["loc"][0])).upper() if e["loc"] else prefix
            problems.append(f"{field} ({env}): {e['msg']}")
        raise SettingsError(f"invalid {cls.__name__}: " + "; ".join(problems)) from None


def load_or_exit(cls: type[S], **overrides: object) -> S:
    """`load_settings` for a process's main: invalid settings are printed, naming each field
    and its variable, and the process exits with status 2 (a configuration error, which a
    restart does not mend)."""
    try:
        return load_settings(cls, **overrides)
    except SettingsError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
