"""Inference engines behind the Generation service: the interface (base.py) and its
implementations, each imported only when chosen because each pulls in heavy packages."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tuneloop.generation.engines.base import Engine
    from tuneloop.generation.settings import GenerationSettings


def create_engine(settings: GenerationSettings) -> Engine:
    """The engine `settings.engine` names."""
    if settings.engine == "vllm":
        from tuneloop.generation.engines.vllm_engine import VllmEngine

        return VllmEngine(settings)
    from tuneloop.generation.engines.transformers_engine import TransformersEngine

    return TransformersEngine(settings)
