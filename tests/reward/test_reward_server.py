"""The Reward gRPC service on a free port with tiny reward models from a real registry:
scores equal in-process scoring, batching under concurrency, precise INVALID_ARGUMENT,
hot swap when the production alias moves, pinned versions, metrics."""

from __future__ import annotations

import shutil
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tuneloop.common import reward_format as rf
from tuneloop.common.errors import field_of
from tuneloop.common.kafka import MODELS_TOPIC, KafkaSettings, ensure_topics, make_producer
from tuneloop.common.tiny_models import make_tiny
from tuneloop.common.registry import Registry
from tuneloop.reward.formatting import to_proto_prompt
from tuneloop.reward.server import build_server
from tuneloop.reward.settings import RewardSettings
from tuneloop.v1 import completion_pb2, model_event_pb2, reward_pb2, reward_pb2_grpc
from tests.support.reward import in_process, metric, request, serving

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of France?"}]
PROMPTS: list[rf.Prompt] = [CHAT, "Q: What boils at 100 degrees?\nA: ", [{"role": "user", "content": "Hi"}], CHAT]
RESPONSES = ["Paris.", "Water, at sea level.", "Hello! How can I help you today?", ""]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two reward models with different weights (seeds 0 and 1)."""
    root = tmp_path_factory.mktemp("tiny")
    return make_tiny(root / "a", seed=0)[1], make_tiny(root / "b", seed=1)[1]


@pytest.fixture
def registry(tmp_path: Path, tiny: tuple[Path, Path]) -> Registry:
    reg = Registry(tmp_path / "registry")
    reg.register("reward", tiny[0], kind="reward")
    reg.promote("reward", "v0001")
    return reg


def test_service_scores_equal_in_process_scores(registry: Registry, tiny: tuple[Path, Path]) -> None:
    expected = in_process(tiny[0], PROMPTS, RESPONSES)
    with serving(registry) as (_, stub):
        reply = stub.Score(request(PROMPTS, RESPONSES), timeout=30)
    assert list(reply.scores) == pytest.approx(expected, rel=1e-5, abs=1e-5)
    assert reply.model == completion_pb2.ModelVersion(name="reward", version="v0001")
    # Different inputs do score differently: equality above is not a constant.
    assert len({round(s, 4) for s in expected}) == len(expected)


def test_concurrent_calls_are_batched_and_answered_in_order(registry: Registry, tiny: tuple[Path, Path]) -> None:
    prompts = [[{"role": "user", "content": f"Question number {i}?"}] for i in range(12)]
    responses = [f"Answer {i}." * (1 + i % 3) for i in range(12)]
    expected = in_process(tiny[0], prompts, responses)
    batches, pairs = metric("tuneloop_reward_batch_size_count"), metric("tuneloop_reward_batch_size_sum")
    # A wide window so that calls released together land in the same batches.
    with serving(registry, batch_window_ms=500, max_batch_size=64) as (_, stub):
        barrier = threading.Barrier(12)

        def call(i: int) -> float:
            barrier.wait()
            return stub.Score(request([prompts[i]], [responses[i]]), timeout=30).scores[0]

        with ThreadPoolExecutor(12) as pool:
            got = list(pool.map(call, range(12)))
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-5)
    assert metric("tuneloop_reward_batch_size_sum") - pairs == 12
    assert metric("tuneloop_reward_batch_size_count") - batches < 12


@pytest.mark.parametrize(
    ("items", "field"),
    [
        ([], "items"),
        ([("q", "a")] * 5, "items"),
        ([("q", "a")] * 3 + [("q", "x" * 300)], "items[3].response"),
        ([(None, "a")], "items[0].prompt"),
        ([("q", "a"), ("q", "word " * 40)], "items[1].response"),
        ([("word " * 40, "a")], "items[0].prompt"),
        ([([{"role": "robot", "content": "hi"}], "a")], "items[0].prompt.chat.messages[0].role"),
        ([([], "a")], "items[0].prompt.chat.messages"),
    ],
)
def test_invalid_requests_name_the_field(registry: Registry, items: list[tuple[Any, str]], field: str) -> None:
    def item(prompt: Any, response: str) -> reward_pb2.ScoreItem:
        if prompt is None:
            return reward_pb2.ScoreItem(response=response)
        if prompt == []:
            return reward_pb2.ScoreItem(
                prompt=completion_pb2.Prompt(chat=completion_pb2.Conversation()), response=response
            )
        return reward_pb2.ScoreItem(prompt=to_proto_prompt(prompt), response=response)

    with serving(registry, max_request_items=4, max_response_chars=200, max_tokens=32) as (_, stub):
        with pytest.raises(grpc.RpcError) as caught:
            stub.Score(reward_pb2.ScoreRequest(items=[item(p, r) for p, r in items]), timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_of(caught.value) == field
    assert field in caught.value.details()


def test_model_field_is_checked(registry: Registry) -> None:
    with serving(registry) as (_, stub):
        with pytest.raises(grpc.RpcError) as caught:
            stub.Score(request(["q"], ["a"], model="policy@v0001"), timeout=30)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field_of(caught.value) == "model"
        with pytest.raises(grpc.RpcError) as caught:
            stub.Score(request(["q"], ["a"], model="v0042"), timeout=30)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def _wait_for_version(
    stub: reward_pb2_grpc.RewardStub, version: str, timeout_s: float = 60
) -> reward_pb2.ScoreResponse:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            reply = stub.Score(request(PROMPTS, RESPONSES), timeout=30)
            if reply.model.version == version or time.monotonic() > deadline:
                return reply
        except grpc.RpcError as err:  # UNAVAILABLE until the first model is loaded
            if err.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
        time.sleep(0.05)


def test_hot_swap_follows_the_alias_and_pinned_versions_stay(registry: Registry, tiny: tuple[Path, Path]) -> None:
    before, after = in_process(tiny[0], PROMPTS, RESPONSES), in_process(tiny[1], PROMPTS, RESPONSES)
    swaps = metric("tuneloop_reward_model_swaps_total")
    with serving(registry) as (server, stub):
        assert stub.Score(request(PROMPTS, RESPONSES), timeout=30).model.version == "v0001"
        registry.register("reward", tiny[1], kind="reward")
        registry.promote("reward", "v0002")

        reply = _wait_for_version(stub, "v0002")
        assert reply.model.version == "v0002"
        assert list(reply.scores) == pytest.approx(after, rel=1e-5, abs=1e-5)
        assert metric("tuneloop_reward_model_swaps_total") == swaps + 1
        assert metric("tuneloop_reward_model_info", backend="model", model="reward@v0002") == 1
        assert metric("tuneloop_reward_model_info", backend="model", model="reward@v0001") == 0

        pinned = stub.Score(request(PROMPTS, RESPONSES, model="v0001"), timeout=30)
        assert pinned.model.version == "v0001"
        assert list(pinned.scores) == pytest.approx(before, rel=1e-5, abs=1e-5)

        registry.rollback("reward")
        assert _wait_for_version(stub, "v0001").model.version == "v0001"

        text = httpx.get(f"http://127.0.0.1:{server.metrics_port}/metrics").text
    assert 'tuneloop_reward_score_bucket{le="0.0",model="reward@v0002"}' in text
    assert "tuneloop_reward_grpc_requests_total" in text


def test_not_serving_until_a_model_is_promoted(tmp_path: Path, tiny: tuple[Path, Path]) -> None:
    registry = Registry(tmp_path / "registry")
    registry.register("reward", tiny[0], kind="reward")
    with serving(registry) as (server, stub), grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        assert (
            health.Check(health_pb2.HealthCheckRequest(service="")).status == health_pb2.HealthCheckResponse.NOT_SERVING
        )
        with pytest.raises(grpc.RpcError) as caught:
            stub.Score(request(["q"], ["a"]), timeout=30)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE

        registry.promote("reward", "v0001")
        assert _wait_for_version(stub, "v0001").model.version == "v0001"
        assert health.Check(health_pb2.HealthCheckRequest(service="")).status == health_pb2.HealthCheckResponse.SERVING


def test_a_fixed_folder_is_served_without_a_registry_alias(tmp_path: Path, tiny: tuple[Path, Path]) -> None:
    with serving(Registry(tmp_path / "empty"), model=str(tiny[1])) as (_, stub):
        reply = stub.Score(request(PROMPTS, RESPONSES), timeout=30)
        assert reply.model.version == "unregistered"
        assert list(reply.scores) == pytest.approx(in_process(tiny[1], PROMPTS, RESPONSES), rel=1e-5, abs=1e-5)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Score(request(["q"], ["a"], model="v0001"), timeout=30)
        assert field_of(caught.value) == "model"


def test_a_promoted_version_that_fails_to_load_leaves_the_old_one_serving(
    registry: Registry, tiny: tuple[Path, Path], tmp_path: Path
) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny[1], broken)
    (broken / "model.safetensors").write_bytes(b"not a model")
    failures = metric("tuneloop_reward_model_load_failures_total")
    with serving(registry) as (_, stub):
        registry.register("reward", broken, kind="reward")
        registry.promote("reward", "v0002")
        deadline = time.monotonic() + 60
        while metric("tuneloop_reward_model_load_failures_total") == failures:
            assert time.monotonic() < deadline, "the broken version was never tried"
            time.sleep(0.05)
        time.sleep(0.5)  # ten more polls: the broken version is not loaded again
        assert metric("tuneloop_reward_model_load_failures_total") == failures + 1
        assert stub.Score(request(PROMPTS, RESPONSES), timeout=30).model.version == "v0001"

        registry.register("reward", tiny[1], kind="reward")
        registry.promote("reward", "v0003")
        assert _wait_for_version(stub, "v0003").model.version == "v0003"


def test_a_model_event_swaps_without_waiting_for_the_poll(
    registry: Registry, tiny: tuple[Path, Path], kafka_bootstrap: str
) -> None:
    # Polling once a minute: within the test only the event can trigger the swap.
    settings = RewardSettings(port=0, metrics_port=0, host="127.0.0.1", model="reward@production", alias_poll_s=60)
    kafka = KafkaSettings(bootstrap_servers=kafka_bootstrap)
    with build_server(settings, registry, kafka) as server, grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        stub = reward_pb2_grpc.RewardStub(ch)
        follower = server.catalog.follower
        assert follower is not None and follower.events_ready.wait(60), "the model-event consumer never joined"
        assert stub.Score(request(PROMPTS, RESPONSES), timeout=30).model.version == "v0001"

        registry.register("reward", tiny[1], kind="reward")
        registry.promote("reward", "v0002")
        ensure_topics(kafka, [MODELS_TOPIC])
        now = Timestamp()
        now.GetCurrentTime()
        event = model_event_pb2.ModelEvent(
            event_id=uuid.uuid4().hex, type=model_event_pb2.MODEL_EVENT_TYPE_PROMOTED, name="reward",
            version="v0002", alias="production", previous_version="v0001", kind="reward", created_at=now,
        )
        producer = make_producer(kafka)
        producer.send(MODELS_TOPIC, key=b"reward", value=event.SerializeToString()).get(timeout=30)
        producer.close()
        assert _wait_for_version(stub, "v0002", timeout_s=30).model.version == "v0002"
