"""RewardClient and its TRL reward function against a real Reward server on a free port."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from tests.support.reward import in_process, metric, serving
from tuneloop.common.tiny_models import make_tiny
from tuneloop.common.registry import Registry
from tuneloop.reward.client import RewardClient, completion_text

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a fruit."}],
    [{"role": "user", "content": "Say hello."}],
]
ANSWERS = ["Paris.", "An apple.", "Hello!"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("tiny"))[1]


@pytest.fixture
def registry(tmp_path: Path, tiny: Path) -> Registry:
    reg = Registry(tmp_path / "registry")
    reg.register("reward", tiny, kind="reward")
    reg.promote("reward", "v0001")
    return reg


def test_completion_text_reads_strings_and_messages() -> None:
    assert completion_text("plain") == "plain"
    assert completion_text([{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}]) == "ab"


def test_reward_func_conversational_and_standard(registry: Registry, tiny: Path) -> None:
    raw_prompts = ["Q: What is the capital of France?\nA: ", "Q: Name a fruit.\nA: ", "Q: Say hello.\nA: "]
    with serving(registry, max_request_items=2) as (server, _):
        client = RewardClient(f"127.0.0.1:{server.port}", max_items=2)
        reward = client.as_reward_func()
        # TRL's conversational format: completions are lists of assistant messages.
        chat = reward(
            prompts=CHATS, completions=[[{"role": "assistant", "content": a}] for a in ANSWERS], trainer_state=None
        )
        standard = reward(raw_prompts, ANSWERS, completion_ids=[[1], [2], [3]])
        assert client.last_version.version == "v0001"
        client.close()
    assert chat == pytest.approx(in_process(tiny, CHATS, ANSWERS), rel=1e-5, abs=1e-5)
    assert standard == pytest.approx(in_process(tiny, raw_prompts, ANSWERS), rel=1e-5, abs=1e-5)
    assert chat != pytest.approx(standard)  # the chat template is applied, not plain text
    assert reward.__name__ == "reward_service"


def test_deadline_is_enforced(registry: Registry) -> None:
    # A batch window far beyond the client's deadline: the call cannot finish in time.
    with serving(registry, batch_window_ms=3000) as (server, _):
        with RewardClient(f"127.0.0.1:{server.port}", timeout_s=0.3) as client:
            with pytest.raises(grpc.RpcError) as caught:
                client.score(CHATS[:1], ANSWERS[:1])
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_unavailable_is_retried(tmp_path: Path, tiny: Path) -> None:
    registry = Registry(tmp_path / "registry")
    registry.register("reward", tiny, kind="reward")  # registered, never promoted: UNAVAILABLE
    with serving(registry) as (server, _):
        before = metric("tuneloop_reward_grpc_requests_total", method="Score", code="UNAVAILABLE")
        with RewardClient(f"127.0.0.1:{server.port}", attempts=3) as client:
            with pytest.raises(grpc.RpcError) as caught:
                client.score(CHATS[:1], ANSWERS[:1])
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert metric("tuneloop_reward_grpc_requests_total", method="Score", code="UNAVAILABLE") - before == 3
