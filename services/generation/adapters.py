"""LoRA adapter versions: recognise them and find the base model they are applied to.

A version folder holding peft's `adapter_config.json` is a LoRA adapter, not a full model.
Its base is, in this order:

1. the registry card's `parent`, when that version is a full model (the registry's lineage);
2. adapter_config's `base_model_name_or_path`, when it is a registry ref (`NAME@vNNNN`,
   `NAME@ALIAS`) or an existing full-model folder (a folder inside the registry maps back to
   its name and version).

An adapter whose base is itself an adapter is refused: serving it would need the merged
weights its training started from.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tuneloop.common.registry import VERSION_RE, Registry, RegistryError
from tuneloop.generation.engines.base import ModelRef

ADAPTER_CONFIG = "adapter_config.json"


class AdapterError(RegistryError):
    """An adapter version cannot be served (no usable base, not LoRA, ...)."""


def is_adapter(path: Path) -> bool:
    return (path / ADAPTER_CONFIG).is_file()


def adapter_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads((path / ADAPTER_CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise AdapterError(f"{path / ADAPTER_CONFIG}: cannot read it: {err}") from err
    if config.get("peft_type") != "LORA":
        raise AdapterError(f"{path}: only LoRA adapters are served, not peft_type {config.get('peft_type')!r}")
    return config


def _is_full_model(path: Path) -> bool:
    return (path / "config.json").is_file() and not is_adapter(path)


def _registry_version(folder: Path, registry: Registry | None) -> ModelRef:
    """A full-model folder as a ModelRef: name@version when it lies in the registry, else local."""
    folder = folder.resolve()
    if registry is not None:
        root = registry.root.resolve()
        parts = folder.relative_to(root).parts if folder.is_relative_to(root) else ()
        if len(parts) == 3 and parts[1] == "versions" and VERSION_RE.match(parts[2]):
            return ModelRef(parts[0], parts[2], folder)
    return ModelRef(folder.name, "local", folder)


def _from_ref(ref: str, registry: Registry | None) -> ModelRef | None:
    """A registry ref or a folder as a full-model ModelRef; None when it names nothing usable."""
    if registry is not None and "@" in ref and "/" not in ref:
        try:
            path = registry.resolve(ref)
        except RegistryError:
            return None
        name, version = ref.split("@", 1)[0], path.name
        return ModelRef(name, version, path)
    folder = Path(ref)
    if folder.is_dir():
        return _registry_version(folder, registry)
    return None


def with_base(ref: ModelRef, registry: Registry | None) -> ModelRef:
    """`ref` unchanged for a full model; for a LoRA adapter, `ref` with its base filled in.

    Raises AdapterError when the adapter's base cannot be found or is not a full model.
    """
    if not is_adapter(ref.path):
        return ref
    config = adapter_config(ref.path)
    tried: list[str] = []
    candidates: list[str] = []
    if registry is not None and ref.version != "local":
        try:
            parent = registry.card(f"{ref.name}@{ref.version}").parent
        except RegistryError:
            parent = None
        if parent:
            candidates.append(parent)
    named = config.get("base_model_name_or_path")
    if named:
        candidates.append(str(named))
    for candidate in candidates:
        base = _from_ref(candidate, registry)
        if base is None:
            tried.append(f"{candidate!r} (not found)")
        elif not _is_full_model(base.path):
            tried.append(f"{candidate!r} (not a full model: stacked adapters are not served)")
        else:
            return ModelRef(ref.name, ref.version, ref.path, base=base)
    why = "; ".join(tried) or "neither the registry card's parent nor adapter_config's base_model_name_or_path is set"
    raise AdapterError(f"LoRA adapter {ref.name}@{ref.version} at {ref.path}: no base model to serve it on: {why}")


def lora_rank(ref: ModelRef) -> int:
    """The largest rank of an adapter (its `r`, or the largest of its rank_pattern)."""
    config = adapter_config(ref.path)
    ranks = [int(config.get("r") or 0), *(int(r) for r in (config.get("rank_pattern") or {}).values())]
    return max(ranks)
