"""The LLM-judge backend over real HTTP. The project's gateway (the OpenAI-compatible
endpoint a judge would normally sit behind) is tested elsewhere; here a small FastAPI app
on a free port implements `/v1/chat/completions` with a scripted judge."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import uvicorn
from fastapi import FastAPI, Header, HTTPException

from tests.test_reward_server import request, serving
from tests.test_reward_stage import GOOD, synthetic_rows
from tuneloop.common.broker import free_port
from tuneloop.common.models import make_tiny
from tuneloop.common.registry import Registry
from tuneloop.common.settings import SettingsError, load_settings
from tuneloop.reward.judge import REMINDER, JudgeScorer, parse_score
from tuneloop.reward.scorer import ModelScorer, agreement_with_labels
from tuneloop.reward.settings import RewardSettings
from tuneloop.v1 import completion_pb2

RUBRIC = "Grade how polite and correct the response is."


class ScriptedJudge:
    """Answers by the response's content; records every request it got."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.app = FastAPI()
        self.app.post("/v1/chat/completions")(self.complete)

    def complete(self, body: dict[str, Any], authorization: str = Header("")) -> dict[str, Any]:
        if authorization != "Bearer secret":
            raise HTTPException(401, "bad api key")
        self.requests.append(body)
        messages = body["messages"]
        response = messages[1]["content"].split("Response:\n", 1)[1]
        reminded = messages[-1]["content"] == REMINDER
        if "ramble" in response:
            text = "Score: 5" if reminded else "It is a decent answer overall."
        elif "nonsense" in response:
            text = "It is hard to say."
        elif "nan" in response:
            text = "Score: NaN"
        elif GOOD in response:
            text = "Polite and correct.\n**Score**: 8"
        else:
            text = "Correct but curt. 3/10"
        return {
            "id": "x",
            "object": "chat.completion",
            "model": body["model"],
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}],
        }


@pytest.fixture(scope="module")
def judge_endpoint() -> Iterator[tuple[str, ScriptedJudge]]:
    judge = ScriptedJudge()
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(judge.app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "stub chat endpoint did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/v1", judge
    server.should_exit = True
    thread.join(10)


@pytest.fixture
def rubric(tmp_path: Path) -> Path:
    path = tmp_path / "rubric.txt"
    path.write_text(RUBRIC)
    return path


def judge_settings(base_url: str, rubric: Path) -> dict[str, Any]:
    return dict(
        backend="judge",
        judge_base_url=base_url,
        judge_model="judge-model",
        judge_api_key="secret",
        judge_rubric_path=rubric,
    )


def test_parse_score_reads_common_forms() -> None:
    assert parse_score("Score: 7") == 7
    assert parse_score("**Score**: 8") == 8
    assert parse_score('{"score": 9}') == 9
    assert parse_score("I'd say 6/10.") == 6
    assert parse_score(" 4 ") == 4
    assert parse_score("Score: NaN") is None
    assert parse_score("Score: 11") is None
    assert parse_score("no number here") is None


def test_judge_scores_against_stub_chat_endpoint(
    judge_endpoint: tuple[str, ScriptedJudge], rubric: Path, tmp_path: Path
) -> None:
    base_url, judge = judge_endpoint
    prompts = [[{"role": "user", "content": "Can you help?"}], "Q: Help?\nA: ", "Q: Explain.\nA: "]
    responses = [f"Sure. {GOOD}", "Sure.", "Well, let me ramble a bit."]
    judge.requests.clear()
    with serving(Registry(tmp_path / "registry"), **judge_settings(base_url, rubric)) as (_, stub):
        reply = stub.Score(request(prompts, responses), timeout=30)
    assert list(reply.scores) == [8.0, 3.0, 5.0]
    assert reply.model == completion_pb2.ModelVersion(name="judge", version="judge-model")
    assert len(judge.requests) == 4  # the rambling answer was asked again once
    first = judge.requests[0]
    assert first["model"] == "judge-model" and first["temperature"] == 0
    assert first["messages"][0]["content"].startswith(RUBRIC)
    assert any("user: Can you help?" in r["messages"][1]["content"] for r in judge.requests)


@pytest.mark.parametrize("response", ["nonsense, twice", "nan"])
def test_unparseable_judge_answers_fail_the_call_against_stub_chat_endpoint(
    judge_endpoint: tuple[str, ScriptedJudge], rubric: Path, tmp_path: Path, response: str
) -> None:
    base_url, _ = judge_endpoint
    with serving(Registry(tmp_path / "registry"), **judge_settings(base_url, rubric)) as (_, stub):
        with pytest.raises(grpc.RpcError) as caught:
            stub.Score(request(["q"], [response]), timeout=30)
        # Other calls are unaffected.
        assert list(stub.Score(request(["q"], ["fine"]), timeout=30).scores) == [3.0]
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert "no 1-10 score twice" in caught.value.details()


def test_unreachable_judge_is_unavailable(rubric: Path, tmp_path: Path) -> None:
    settings = judge_settings(f"http://127.0.0.1:{free_port()}/v1", rubric)
    with serving(Registry(tmp_path / "registry"), **settings) as (_, stub):
        with pytest.raises(grpc.RpcError) as caught:
            stub.Score(request(["q"], ["a"]), timeout=30)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def test_judge_and_reward_model_agreement_measured_alike_against_stub_chat_endpoint(
    judge_endpoint: tuple[str, ScriptedJudge], tmp_path: Path
) -> None:
    base_url, _ = judge_endpoint
    rows = synthetic_rows(16)
    judge = JudgeScorer(base_url, "judge-model", RUBRIC, api_key="secret")
    try:
        judged = agreement_with_labels(rows, judge)
    finally:
        judge.close()
    # The scripted judge prefers the thank-you answers, as the labels do (except split votes).
    assert judged["accuracy_single"] == judged["accuracy_unanimous"] == 1.0
    assert judged["accuracy_split"] == pytest.approx(2 / 3)

    folder = make_tiny(tmp_path / "tiny")[1]
    model = ModelScorer(folder, completion_pb2.ModelVersion(name="reward", version="x"), "cpu", 1024)
    measured = agreement_with_labels(rows, model)
    assert measured.keys() == judged.keys()
    assert measured["pairs"] == judged["pairs"] == 16 + 2 * 8  # 1 or 3 votes per prompt; ties not scored


def test_judge_backend_needs_its_endpoint_model_and_rubric(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="judge_base_url, judge_model, judge_rubric_path"):
        load_settings(RewardSettings, backend="judge")
    with pytest.raises(SettingsError, match="is not a file"):
        load_settings(RewardSettings, **judge_settings("http://x/v1", tmp_path / "missing.txt"))
