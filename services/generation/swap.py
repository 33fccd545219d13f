"""How the Generation service follows its registry alias: the shared `AliasFollower` (polling,
plus model events when Kafka is on) hands each new version to `swap_to`, which loads it next
to the served one and switches the engine over (engines swap atomically)."""

from __future__ import annotations

import logging
import time
import uuid

from tuneloop.common.alias_follower import AliasFollower
from tuneloop.common.kafka import KafkaSettings
from tuneloop.common.kafka_acls import MODEL_WATCH_GROUP_PREFIX
from tuneloop.common.registry import Registry
from tuneloop.generation import metrics
from tuneloop.generation.adapters import with_base
from tuneloop.generation.engines.base import Engine, ModelRef

log = logging.getLogger(__name__)


def swap_to(engine: Engine, registry: Registry, version: str) -> None:
    """Serve `version` of the engine's model (with its base when it is an adapter)."""
    name = engine.model.name
    started = time.monotonic()
    try:
        ref = with_base(ModelRef(name, version, registry.resolve(f"{name}@{version}")), registry)
        engine.swap(ref)
    except Exception:
        metrics.SWAPS.labels(result="failed").inc()
        raise
    metrics.SWAPS.labels(result="ok").inc()
    metrics.SWAP_SECONDS.observe(time.monotonic() - started)
    metrics.set_model_info(name, version, engine.name)
    base = {"base": f"{ref.base.name}@{ref.base.version}"} if ref.base else {}
    log.info("serving new version", extra={"fields": {"model": f"{name}@{version}", **base}})


def follow(
    engine: Engine, registry: Registry, alias: str, *, interval_s: float, kafka: KafkaSettings | None
) -> AliasFollower:
    """A follower (not started) that swaps the engine whenever `alias` of its model moves."""
    return AliasFollower(
        registry,
        engine.model.name,
        alias,
        engine.model.version,
        lambda version: swap_to(engine, registry, version),
        interval_s=interval_s,
        kafka=kafka,
        # A group per replica, under the prefix the generation user's Kafka ACL grants.
        group_id=f"{MODEL_WATCH_GROUP_PREFIX}{uuid.uuid4().hex[:12]}" if kafka is not None else None,
    )
