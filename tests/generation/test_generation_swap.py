"""Continuous batching of the transformers engine, and the Kafka fast path of the hot swap."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from tests.support.generation import (
    Served,
    make_registry,
    raw,
    wait_for,
)
from tuneloop.common.kafka import MODELS_TOPIC, KafkaSettings, ensure_topics, make_producer
from tuneloop.generation.server import GenerationApp
from tuneloop.generation.settings import GenerationSettings
from tuneloop.v1 import generation_pb2, model_event_pb2


@pytest.fixture
def app(tmp_path: Path, tiny_policies: tuple[Path, Path], kafka_bootstrap: str) -> Iterator[GenerationApp]:
    # Polling once a minute: within a test only a Kafka event can trigger the swap.
    settings = GenerationSettings(
        port=0, metrics_port=0, host="127.0.0.1", spool_path=tmp_path / "spool", alias_poll_s=60,
        batch_window_ms=50, max_batch_size=8,
    )
    registry = make_registry(tmp_path / "registry", tiny_policies)
    with GenerationApp(settings, kafka=KafkaSettings(bootstrap_servers=kafka_bootstrap), registry=registry) as app:
        yield app


def _served(app: GenerationApp) -> Served:
    assert app.server.metrics_port is not None
    return Served("transformers", app.target, app.server.metrics_port, app.registry)


def test_concurrent_requests_are_batched(app: GenerationApp) -> None:
    served = _served(app)
    stub = served.stub()
    batches = served.metric("tuneloop_generation_batch_size_count")
    singles = served.metric("tuneloop_generation_batch_size_bucket", le="1.0")
    prompts = [f"Cats and dogs {i}" for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda p: stub.Generate(raw(p, temperature=0, max_tokens=16), timeout=120), prompts))
    assert all(a.completions[0].completion_tokens == 16 for a in answers)
    new_batches = served.metric("tuneloop_generation_batch_size_count") - batches
    new_singles = served.metric("tuneloop_generation_batch_size_bucket", le="1.0") - singles
    assert new_batches < 8 and new_batches - new_singles >= 1  # some batch held more than one

    # Batching does not change answers: each prompt alone gives the same greedy text.
    for prompt, batched in zip(prompts[:3], answers[:3], strict=True):
        alone = stub.Generate(raw(prompt, temperature=0, max_tokens=16), timeout=60)
        assert alone.completions[0].text == batched.completions[0].text


def test_requests_join_a_running_batch_between_steps(app: GenerationApp) -> None:
    """A request that arrives while a batch is generating joins it at the next step (one
    batch ran them all), with a longer prompt and a shorter one than the running row's, and
    no answer changes: each equals the same prompt generated alone."""
    served = _served(app)
    stub = served.stub()
    running, joiners = "Cats and dogs", ["The capital of France is a city of bridges and", "1"]
    alone = {p: stub.Generate(raw(p, temperature=0, max_tokens=8), timeout=60).completions[0].text for p in joiners}
    long_alone = stub.Generate(raw(running, temperature=0, max_tokens=200), timeout=60).completions[0].text
    batches = served.metric("tuneloop_generation_batch_size_count")
    singles = served.metric("tuneloop_generation_batch_size_bucket", le="1.0")

    stream = stub.GenerateStream(raw(running, temperature=0, max_tokens=1000), timeout=120)
    chunks = [next(stream)]  # the batch is running
    joined = [stub.Generate(raw(p, temperature=0, max_tokens=8), timeout=60).completions[0].text for p in joiners]
    while chunks[-1].completion_tokens < 48:
        chunks.append(next(stream))
    assert not chunks[-1].finish_reason, "the running request was still generating when the others ended"
    stream.cancel()

    assert joined == [alone[p] for p in joiners]
    assert long_alone.startswith("".join(c.delta for c in chunks))
    wait_for(lambda: served.metric("tuneloop_generation_batch_size_count") == batches + 1, 30, "the batch to end")
    assert served.metric("tuneloop_generation_batch_size_bucket", le="1.0") == singles


def test_model_event_triggers_the_swap_without_waiting_for_the_poll(app: GenerationApp, kafka_bootstrap: str) -> None:
    assert app.watcher is not None
    wait_for(app.watcher.events_ready.is_set, 60, "the model-event consumer to join")
    stub = _served(app).stub()
    assert stub.Generate(raw("x", max_tokens=1), timeout=30).model.version == "v0001"

    app.registry.promote("policy", "v0002")
    kafka = KafkaSettings(bootstrap_servers=kafka_bootstrap)
    ensure_topics(kafka, [MODELS_TOPIC])
    now = Timestamp()
    now.GetCurrentTime()
    event = model_event_pb2.ModelEvent(
        event_id=uuid.uuid4().hex, type=model_event_pb2.MODEL_EVENT_TYPE_PROMOTED, name="policy", version="v0002",
        alias="production", previous_version="v0001", kind="policy", created_at=now,
    )
    producer = make_producer(kafka)
    producer.send(MODELS_TOPIC, key=b"policy", value=event.SerializeToString()).get(timeout=30)
    producer.close()

    wait_for(
        lambda: stub.ListModels(generation_pb2.ListModelsRequest(), timeout=30).models[0].model.version == "v0002",
        30,
        "the swap after the event (the poll is a minute away)",
    )
    assert stub.Generate(raw("x", max_tokens=1), timeout=30).model.version == "v0002"
