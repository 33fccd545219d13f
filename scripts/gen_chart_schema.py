"""Write the code-derived parts of charts/tuneloop/values.schema.json.

The chart hands two documents to the trainer and environment variables to every service; the
code, not the chart, decides what they may hold. This script copies that into the schema, so
that `helm lint`, `helm template` and `helm install` refuse what the code would refuse:

- `trainer.retrainConfig`: the JSON schema of `tuneloop.trainer.retrain.RetrainConfig`
  (written to /etc/tuneloop/retrain.yaml); its `reward_model` takes the fields of
  `RewardStageConfig` the pipeline does not set itself;
- `trainer.successCriteria`: the JSON schema of `tuneloop.trainer.criteria.Criteria`
  (written to /etc/tuneloop/success-criteria.yaml);
- every `extraEnv` list: a variable named `TUNELOOP_*` must be one a settings class
  (a pydantic `BaseSettings` under services/ with an env prefix) reads.

pydantic's sub-models (`$defs`, referenced as `#/$defs/X`) are moved into the schema's
`definitions` as `RetrainConfig.X`, `Criteria.X` and `RewardStageConfig.X`, and the schema is
kept to JSON Schema draft-07, the draft values.schema.json declares (tuples as `items` arrays).
Everything else in values.schema.json is written by hand and left as it is.

`make chart-schema` runs it; `--check` exits 1 when the committed schema is stale (a test runs it).
"""

from __future__ import annotations

import argparse
import copy
import importlib
import inspect
import json
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ROOT / "charts" / "tuneloop" / "values.schema.json"
SERVICES = ROOT / "services"
PACKAGE = "tuneloop"  # services/ is the package `tuneloop` (pyproject.toml)

# Definitions this script owns (everything under these names is rewritten on each run).
PREFIXES = ("RetrainConfig", "Criteria", "RewardStageConfig")
ENV_NAMES = "tuneloopEnvName"
ENV_PREFIX = "TUNELOOP_"


# ---- pydantic schema -> draft-07 definitions ----------------------------------------------


def _convert(node: Any, prefix: str) -> Any:
    """pydantic's JSON schema (2020-12 flavoured) as draft-07, refs pointing at `definitions`."""
    if isinstance(node, list):
        return [_convert(item, prefix) for item in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "title" and isinstance(value, str):
            continue  # generated from the field name; the description says more
        if key in ("default", "enum", "const", "examples"):
            out[key] = value  # values, not schemas
            continue
        if key == "$ref" and isinstance(value, str):
            out[key] = _ref(value, prefix)
        elif key == "discriminator" and isinstance(value, dict):
            # OpenAPI's keyword (ignored by validators): keep its mapping pointing at real places.
            mapping = {k: _ref(v, prefix) for k, v in (value.get("mapping") or {}).items()}
            out[key] = {**value, **({"mapping": mapping} if mapping else {})}
        elif key == "prefixItems":
            # A tuple: draft-07 spells it as an `items` array with no further items.
            out["items"] = _convert(value, prefix)
            out["additionalItems"] = False
        elif key in ("properties", "patternProperties", "$defs", "definitions"):
            # Maps of names to schemas: the names are not keywords.
            out[key] = {name: _convert(sub, prefix) for name, sub in value.items()}
        else:
            out[key] = _convert(value, prefix)
    return out


def _ref(ref: str, prefix: str) -> str:
    m = re.fullmatch(r"#/\$defs/(.+)", ref)
    if m is None:
        raise ValueError(f"unexpected $ref {ref!r} in the {prefix} schema")
    return f"#/definitions/{prefix}.{m.group(1)}"


def model_schema(model: type, prefix: str, definitions: dict[str, Any]) -> dict[str, Any]:
    """The model's schema (draft-07); its sub-models are added to `definitions` under `prefix.`."""
    schema = copy.deepcopy(model.model_json_schema())
    for name, sub in schema.pop("$defs", {}).items():
        definitions[f"{prefix}.{name}"] = _convert(sub, prefix)
    return _convert(schema, prefix)


def reward_model_schema(definitions: dict[str, Any]) -> dict[str, Any]:
    """`RetrainConfig.reward_model`: RewardStageConfig's fields but those the pipeline sets.

    RetrainConfig validates the dict against RewardStageConfig merged with what the pipeline
    fills in (base_model defaults to <reward_name>@production), and refuses the owned fields.
    """
    from tuneloop.trainer.retrain import _REWARD_OWNED
    from tuneloop.trainer.reward_stage import RewardStageConfig

    schema = model_schema(RewardStageConfig, "RewardStageConfig", definitions)
    schema["properties"] = {k: v for k, v in schema["properties"].items() if k not in _REWARD_OWNED}
    schema.pop("required", None)
    schema["additionalProperties"] = False
    schema["description"] = (
        "Reward model retrain: RewardStageConfig fields except "
        + ", ".join(_REWARD_OWNED)
        + " (set by the pipeline); base_model defaults to <reward_name>@production."
    )
    return schema


def retrain_config_schema(definitions: dict[str, Any]) -> dict[str, Any]:
    from tuneloop.trainer.retrain import RetrainConfig

    schema = model_schema(RetrainConfig, "RetrainConfig", definitions)
    field = schema["properties"]["reward_model"]
    branches = field.get("anyOf") or []
    objects = [b for b in branches if b.get("type") == "object"]
    if len(objects) != 1 or len(branches) != 2:
        raise ValueError(f"RetrainConfig.reward_model changed shape ({field}); update {Path(__file__).name}")
    definitions["RetrainConfig.RewardModel"] = reward_model_schema(definitions)
    branches[branches.index(objects[0])] = {"$ref": "#/definitions/RetrainConfig.RewardModel"}
    # Defaults computed at run time (env, the device) have no `default` in pydantic's schema:
    # a value left out of the chart stays out of the file and the code computes it there.
    schema["description"] = (
        "Written to /etc/tuneloop/retrain.yaml: tuneloop.trainer.retrain.RetrainConfig "
        "(generated by scripts/gen_chart_schema.py)."
    )
    return schema


def criteria_schema(definitions: dict[str, Any]) -> dict[str, Any]:
    from tuneloop.trainer.criteria import Criteria

    schema = model_schema(Criteria, "Criteria", definitions)
    schema["description"] = (
        "Written to /etc/tuneloop/success-criteria.yaml: tuneloop.trainer.criteria.Criteria "
        "(generated by scripts/gen_chart_schema.py)."
    )
    return schema


# ---- environment variables the settings classes read -------------------------------------


# A module that may define a settings class: a class whose bases name a *Settings class
# (BaseSettings itself, or a shared base such as tuneloop.common.settings.ServiceSettings).
_DEFINES_SETTINGS = re.compile(r"^class \w+\([^)]*Settings\b", re.MULTILINE)


def settings_classes() -> list[type]:
    """Every pydantic BaseSettings subclass defined under services/ that reads variables of its
    own (an env prefix); the prefix-less bases only lend their fields."""
    from pydantic_settings import BaseSettings

    found: dict[str, type] = {}
    for path in sorted(SERVICES.rglob("*.py")):
        if not _DEFINES_SETTINGS.search(path.read_text()):
            continue
        parts = path.relative_to(SERVICES).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        module = importlib.import_module(".".join((PACKAGE, *parts)))
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if (
                issubclass(cls, BaseSettings)
                and cls is not BaseSettings
                and cls.__module__ == module.__name__
                and cls.model_config.get("env_prefix")
            ):
                found[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return [found[k] for k in sorted(found)]


def env_names(cls: type) -> set[str]:
    """The environment variables `cls` reads, as pydantic-settings looks them up."""
    from pydantic_settings import EnvSettingsSource

    source = EnvSettingsSource(cls)
    names = set()
    for name, field in cls.model_fields.items():
        for _key, env_name, _complex in source._extract_field_info(field, name):
            names.add(env_name.upper())  # case-insensitive settings: the canonical spelling
    return names


def env_schema() -> dict[str, Any]:
    classes = settings_classes()
    # A set: classes share variables (TUNELOOP_STORE_ROOT is the store's root and the feedback
    # service's store_root), and draft-07 wants enum items unique.
    names = sorted({n for cls in classes for n in env_names(cls) if n.startswith(ENV_PREFIX)})
    return {
        "description": "Every TUNELOOP_* variable a settings class reads ("
        + ", ".join(c.__name__ for c in classes)
        + "); generated by scripts/gen_chart_schema.py.",
        "enum": names,
    }


def env_rule() -> dict[str, Any]:
    """Added to each envList item: a TUNELOOP_* name must be one the code reads."""
    return {
        "if": {"properties": {"name": {"type": "string", "pattern": f"^{ENV_PREFIX}"}}, "required": ["name"]},
        "then": {"properties": {"name": {"$ref": f"#/definitions/{ENV_NAMES}"}}},
    }


# ---- the schema file ------------------------------------------------------------------------


def render(current: dict[str, Any]) -> dict[str, Any]:
    schema = copy.deepcopy(current)
    old = schema["definitions"]
    definitions = {
        k: v for k, v in old.items() if k != ENV_NAMES and not any(k.startswith(p + ".") for p in PREFIXES)
    }
    trainer = schema["properties"]["trainer"]["properties"]
    trainer["retrainConfig"] = retrain_config_schema(definitions)
    trainer["successCriteria"] = criteria_schema(definitions)
    definitions[ENV_NAMES] = env_schema()
    definitions["envList"]["items"].update(env_rule())
    # Hand-written definitions first, in their order; then the generated ones, sorted.
    generated = sorted(k for k in definitions if k == ENV_NAMES or any(k.startswith(p + ".") for p in PREFIXES))
    schema["definitions"] = {
        **{k: v for k, v in definitions.items() if k not in generated},
        **{k: definitions[k] for k in generated},
    }
    return schema


def dumps(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the schema file is stale; write nothing")
    parser.add_argument("--schema", type=Path, default=SCHEMA, help="values.schema.json to update")
    args = parser.parse_args(argv)
    text = args.schema.read_text()
    want = dumps(render(json.loads(text)))
    if args.check:
        if text != want:
            print(f"{args.schema} is stale: run `make chart-schema`", file=sys.stderr)
            return 1
        return 0
    if text != want:
        args.schema.write_text(want)
        print(f"wrote {args.schema}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
