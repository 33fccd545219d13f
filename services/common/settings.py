"""Typed settings shared by every service: one class per service or stage, env prefix
`TUNELOOP_`, and a start-up failure that names the offending field."""

from __future__ import annotations

from typing import TypeVar

from pydantic import ValidationError
from pydantic_settings import BaseSettings

S = TypeVar("S", bound=BaseSettings)


class SettingsError(ValueError):
    """Invalid configuration; the message names each bad field and its env variable."""


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
