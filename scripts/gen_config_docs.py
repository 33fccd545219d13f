"""Write docs/configuration.md from the settings classes: their fields are the documentation.

`make docs` runs it; a test fails when the committed file is stale.
"""

from __future__ import annotations

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


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs" / "configuration.md"
    target.write_text(render())
