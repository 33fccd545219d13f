"""Shared fixtures: one real Kafka broker per test session on free loopback ports, a Kubernetes
control plane, an S3 server, and two tiny policies,
a preference store on its own topics and a producer to them."""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from tuneloop.common.local_kafka import LocalBroker, install
from tuneloop.common.kafka import KafkaSettings
from tuneloop.common.tiny_models import make_tiny
from tuneloop.store.consumer import PreferenceStore
from tuneloop.store.settings import StoreSettings

from tests.support import kube as _kube
from tests.support.s3server import s3  # noqa: F401 - the session's S3-compatible server
from tests.support.store import Sender


@pytest.fixture(scope="session")
def _session_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalBroker]:
    broker = LocalBroker(tmp_path_factory.mktemp("kafka"), home=install())
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def kafka_bootstrap(_session_broker: LocalBroker) -> str:
    """host:port of the session's broker (stable across restarts)."""
    return _session_broker.bootstrap


@pytest.fixture
def kafka_broker(_session_broker: LocalBroker) -> Iterator[LocalBroker]:
    """The session's broker itself, for drills that stop, crash or restart it."""
    yield _session_broker
    # A drill that failed half-way must not leave the broker down for the tests after it.
    if not _session_broker.running:
        _session_broker.start()


@pytest.fixture
def kafka_settings(kafka_bootstrap: str) -> KafkaSettings:
    return KafkaSettings(bootstrap_servers=kafka_bootstrap)


@pytest.fixture
def unique_topic(request: pytest.FixtureRequest) -> str:
    """A topic name no other test uses (not created: see ensure_topics)."""
    name = re.sub(r"[^A-Za-z0-9._-]", "-", request.node.name)[:180]
    return f"test.{name}.{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def kube(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_kube.KubeControlPlane]:
    """A real Kubernetes control plane (kine, kube-apiserver, kube-controller-manager; no nodes),
    started once per session. Missing binaries fail the tests that use it, unless
    TUNELOOP_SKIP_KUBE=1 skips them."""
    missing = _kube.missing_binaries()
    if missing:
        message = f"{', '.join(missing)} not built in {_kube.BIN}: `make setup` builds them (scripts/build_kube.sh)"
        if os.environ.get(_kube.SKIP_ENV) == "1":
            pytest.skip(f"{message}; skipped because {_kube.SKIP_ENV}=1")
        pytest.fail(message, pytrace=False)
    plane = _kube.KubeControlPlane(tmp_path_factory.mktemp("kube"))
    plane.start()
    try:
        yield plane
    finally:
        plane.stop()


@pytest.fixture(scope="session")
def tiny_policies(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two tiny policies with the same shape and tokenizer and different weights."""
    root = tmp_path_factory.mktemp("tiny")
    first, _ = make_tiny(root / "a", seed=0)
    second, _ = make_tiny(root / "b", seed=1)
    return first, second


@pytest.fixture
def store_settings(tmp_path: Path) -> StoreSettings:
    tag = uuid.uuid4().hex[:8]
    return StoreSettings(
        root=tmp_path / "store",
        feedback_topic=f"test.feedback.{tag}",
        completions_topic=f"test.completions.{tag}",
        dlq_topic=f"test.dlq.{tag}",
        group_id=f"test-store-{tag}",
        batch_linger_s=0.1,
        end_user_weight=0.5,
    )


@pytest.fixture
def store(store_settings: StoreSettings, kafka_settings: KafkaSettings) -> Iterator[PreferenceStore]:
    with PreferenceStore(store_settings, kafka_settings) as s:
        yield s


@pytest.fixture
def send(kafka_settings: KafkaSettings, store_settings: StoreSettings) -> Iterator[Sender]:
    sender = Sender(kafka_settings, store_settings)
    yield sender
    sender.producer.close()
