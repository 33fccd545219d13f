"""Write docs/configuration.md from the settings classes: their fields are the documentation.

`make docs` runs it; a test fails when the committed file is stale.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = [
    ("Kafka (every service)", "tuneloop.common.kafka", "KafkaSettings"),
    ("Model registry", "tuneloop.common.registry", "RegistrySettings"),
    ("Generation service", "tuneloop.generation.settings", "GenerationSettings"),
    ("Reward service", "tuneloop.reward.settings", "RewardSettings"),
    ("Feedback service", "tuneloop.feedback.settings", "FeedbackSettings"),
    ("Preference store", "tuneloop.store.settings", "StoreSettings"),
    ("Gateway", "tuneloop.gateway.settings", "GatewaySettings"),
    ("Trainer", "tuneloop.trainer.config", "TrainerSettings"),
]


def _default(field) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    return "—" if value is None else f"`{value}`"


def render() -> str:
    out = [
        "# Configuration reference",
        "",
        "Generated from the settings classes by `make docs`; do not edit. Every setting is an",
        "environment variable; `serve` flags (`--port`, `--metrics-port`, `--model`) override them.",
        "An invalid value stops the process at start, naming the field and its variable.",
        "",
    ]
    for title, module, name in SETTINGS:
        cls = getattr(importlib.import_module(module), name)
        prefix = cls.model_config.get("env_prefix", "")
        out += [f"## {title}", "", f"`{module}.{name}`", "", "| variable | default | meaning |", "| --- | --- | --- |"]
        for field_name, field in cls.model_fields.items():
            env = (prefix + field_name).upper()
            aliases = field.validation_alias
            if isinstance(aliases, str):
                env = aliases.upper()
            desc = (field.description or "").replace("|", "\\|").replace("\n", " ")
            default = _default(field).replace("|", "\\|")
            out.append(f"| `{env}` | {default} | {desc} |")
        out.append("")
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", type=Path, default=ROOT / "docs" / "configuration.md", help="File to write.")
    parser.add_argument("--check", action="store_true", help="Write nothing; exit 1 when the file is stale.")
    args = parser.parse_args()
    text = render()
    if args.check:
        if not args.out.is_file() or args.out.read_text() != text:
            print(f"{args.out} is stale: run `make docs`", file=sys.stderr)
            return 1
        return 0
    args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
