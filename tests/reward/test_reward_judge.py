"""The LLM-judge backend over real HTTP: against a small FastAPI app on a free port that
implements `/v1/chat/completions` with a scripted judge, and against tuneloop's own gateway
(real Generation service, transformers engine, tiny seeded policy) as the endpoint."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import uvicorn
from fastapi import FastAPI, Header, HTTPException
from prometheus_client import REGISTRY

from tests.support.generation import make_registry
from tests.support.reward import request, serving
from tests.support.preferences import GOOD, synthetic_rows
from tuneloop.common import reward_format as rf
from tuneloop.common.local_kafka import free_port
from tuneloop.common.kafka import COMPLETIONS_TOPIC, KafkaSettings, make_consumer
from tuneloop.common.tiny_models import make_tiny
from tuneloop.common.registry import Registry
from tuneloop.common.settings import SettingsError, load_settings
from tuneloop.gateway.app import create_app
from tuneloop.gateway.auth import hash_key
from tuneloop.gateway.settings import GatewaySettings
from tuneloop.generation.server import GenerationApp
from tuneloop.generation.settings import GenerationSettings
from tuneloop.reward.judge import FORMAT, REMINDER, JudgeError, JudgeScorer, parse_score
from tuneloop.reward.scorer import ModelScorer, agreement_with_labels
from tuneloop.reward.settings import RewardSettings
from tuneloop.v1 import completion_pb2
from tuneloop.v1.completion_pb2 import CompletionRecord

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


@contextmanager
def http_serving(app: FastAPI) -> Iterator[int]:
    """`app` served by uvicorn on a free loopback port (yielded) in a thread."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "HTTP server did not start"
        time.sleep(0.05)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def judge_endpoint() -> Iterator[tuple[str, ScriptedJudge]]:
    judge = ScriptedJudge()
    with http_serving(judge.app) as port:
        yield f"http://127.0.0.1:{port}/v1", judge


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


# ---- tuneloop's own gateway as the judge endpoint -------------------------------------------
#
# The judge model is the tiny seeded policy, served greedily by the real Generation service
# (transformers engine) behind the real gateway. Its answers are not reliably scores, so the
# tests do not presume them: every answer the gateway gave is on Kafka as a CompletionRecord
# (with the prompt as asked, the tenant of the API key, the model and the sampling), and the
# outcome the judge must reach follows from those answers by its documented rules (a score;
# else asked once more with the reminder; else the call fails naming the last answer). The
# seed-0 policy answers greedily with blank lines, so in practice the failing path runs here;
# the scoring path against a scripted endpoint is tested above.

POLICY = "policy@production"  # the judge model name, as the gateway resolves it
KEYS = {"judge-key": "judge", "reward-key": "reward"}  # API key -> tenant prefix


@dataclass
class Gateway:
    url: str  # the OpenAI-compatible API base, .../v1
    port: int
    tenants: dict[str, str]  # API key -> tenant
    bootstrap: str


@pytest.fixture(scope="module")
def gateway(
    tiny_policies: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory, kafka_bootstrap: str
) -> Iterator[Gateway]:
    root = tmp_path_factory.mktemp("judge-gateway")
    registry = make_registry(root / "registry", tiny_policies)
    tenants = {key: f"{prefix}-{uuid.uuid4().hex[:8]}" for key, prefix in KEYS.items()}
    keys_file = root / "keys.json"
    keys_file.write_text(
        json.dumps([{"sha256": hash_key(k), "tenant": t, "roles": ["app"], "name": k} for k, t in tenants.items()])
    )
    generation = GenerationSettings(
        port=0, metrics_port=0, host="127.0.0.1", engine="transformers", spool_path=root / "spool"
    )
    kafka = KafkaSettings(bootstrap_servers=kafka_bootstrap)
    with GenerationApp(generation, kafka=kafka, registry=registry) as app:
        settings = GatewaySettings(host="127.0.0.1", api_keys_file=keys_file, generation_target=app.target)
        with http_serving(create_app(settings)) as port:
            yield Gateway(f"http://127.0.0.1:{port}/v1", port, tenants, kafka_bootstrap)


def chat_requests(gw: Gateway, status: str) -> float:
    """The gateway's own count of /v1/chat/completions requests answered with `status`. The gateway
    runs in this process and serves /metrics only on its own metrics port, so its registry is read here."""
    value = REGISTRY.get_sample_value("tuneloop_gateway_requests_total",
                                      {"route": "/v1/chat/completions", "status": status})
    return value or 0.0


def tenant_records(gw: Gateway, tenant: str, count: int, timeout_s: float = 30.0) -> list[CompletionRecord]:
    """The completion records of `tenant` on Kafka; fails unless there are exactly `count`."""
    consumer = make_consumer(KafkaSettings(bootstrap_servers=gw.bootstrap), f"test-{uuid.uuid4().hex}",
                             [COMPLETIONS_TOPIC])
    found: list[CompletionRecord] = []

    def poll(timeout_ms: int) -> None:
        for records in consumer.poll(timeout_ms=timeout_ms).values():
            found.extend(r for r in map(CompletionRecord.FromString, (m.value for m in records)) if r.tenant == tenant)

    try:
        deadline = time.monotonic() + timeout_s
        while len(found) < count and time.monotonic() < deadline:
            poll(500)
        poll(1000)  # a little longer, so that extra records would show
    finally:
        consumer.close()
    assert len(found) == count, f"{len(found)} completion records of {tenant}, {count} requests answered"
    return found


def asked(prompt: rf.Prompt, response: str) -> str:
    """The user turn the judge sends for one (prompt, response)."""
    text = prompt if isinstance(prompt, str) else rf.conversation_text(prompt)
    return f"Prompt:\n{text}\n\nResponse:\n{response}"


def judged(records: list[CompletionRecord], prompts: list[Any], responses: list[str], max_tokens: int) -> list[Any]:
    """For each item, the outcome the judge must have reached from the answers on record:
    the score, or the message of the JudgeError it must have raised."""
    system = ("system", f"{RUBRIC}\n\n{FORMAT}")
    for r in records:
        assert r.model == completion_pb2.ModelVersion(name="policy", version="v0001")
        assert r.sampling.temperature == 0 and r.sampling.max_tokens == max_tokens
        assert (r.prompt.chat.messages[0].role, r.prompt.chat.messages[0].content) == system
    outcomes: list[Any] = []
    for prompt, response in zip(prompts, responses, strict=True):
        mine = [r for r in records if r.prompt.chat.messages[1].content == asked(prompt, response)]
        first = [r for r in mine if len(r.prompt.chat.messages) == 2]
        again = [r for r in mine if len(r.prompt.chat.messages) == 4]
        assert len(first) == 1 and len(mine) == 1 + len(again), [list(r.prompt.chat.messages) for r in mine]
        answer = first[0].completion.text
        score = parse_score(answer)
        if score is not None:
            assert not again, f"asked again although {answer!r} has a score"
            outcomes.append(score)
            continue
        assert len(again) == 1, f"{answer!r} has no score, yet the judge did not ask once more"
        turns = [(m.role, m.content) for m in again[0].prompt.chat.messages]
        assert turns == [system, ("user", asked(prompt, response)), ("assistant", answer), ("user", REMINDER)]
        answer = again[0].completion.text
        score = parse_score(answer)
        outcomes.append(
            score if score is not None else f"judge {POLICY} gave no 1-10 score twice; last answer: {answer[:200]!r}"
        )
    assert sum(len([r for r in records if r.prompt.chat.messages[1].content == asked(p, a)])
               for p, a in zip(prompts, responses, strict=True)) == len(records), "records of no item"
    return outcomes


def test_judge_scores_through_tuneloop_gateway(gateway: Gateway) -> None:
    prompts: list[Any] = [[{"role": "user", "content": "Can you help?"}], "Q: What boils at 100 degrees?\nA: ",
                          "Q: Explain.\nA: "]
    responses = [f"Sure. {GOOD}", "Water, at sea level.", "Well, let me ramble a bit."]
    answered, refused = chat_requests(gateway, "200"), chat_requests(gateway, "401")

    judge = JudgeScorer(gateway.url, POLICY, RUBRIC, api_key="judge-key", max_tokens=24)
    try:
        outcome: Any = judge.score_pairs(prompts, responses)
    except JudgeError as err:
        outcome = str(err)
    finally:
        judge.close()  # waits for every item's calls
    stranger = JudgeScorer(gateway.url, POLICY, RUBRIC, api_key="not-a-key")
    try:
        with pytest.raises(JudgeError, match=r"refused the request \(401\)"):
            stranger.score_pairs(["q"], ["a"])
    finally:
        stranger.close()

    calls = chat_requests(gateway, "200") - answered
    assert chat_requests(gateway, "401") - refused == 1
    assert len(prompts) <= calls <= 2 * len(prompts)  # each item asked once, or once more
    records = tenant_records(gateway, gateway.tenants["judge-key"], int(calls))
    expected = judged(records, prompts, responses, max_tokens=24)
    # Every score, or the error of the first item (in order) that had none.
    failed = [e for e in expected if isinstance(e, str)]
    assert outcome == (failed[0] if failed else expected)


def test_reward_service_with_judge_backend_scores_through_tuneloop_gateway(
    gateway: Gateway, rubric: Path, tmp_path: Path
) -> None:
    prompts: list[Any] = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                          "Q: Capital of France?\nA: "]
    responses = ["Hello! How can I help you today?", "Paris."]
    answered = chat_requests(gateway, "200")
    settings = {**judge_settings(gateway.url, rubric), "judge_model": POLICY, "judge_api_key": "reward-key",
                "judge_max_tokens": 16}
    with serving(Registry(tmp_path / "registry"), **settings) as (_, stub):
        try:
            reply = stub.Score(request(prompts, responses), timeout=60)
            outcome: Any = list(reply.scores)
            assert reply.model == completion_pb2.ModelVersion(name="judge", version=POLICY)
        except grpc.RpcError as err:
            outcome = err
    # Leaving `serving` closed the judge, which waited for every item's calls.
    calls = chat_requests(gateway, "200") - answered
    records = tenant_records(gateway, gateway.tenants["reward-key"], int(calls))
    expected = judged(records, prompts, responses, max_tokens=16)
    failed = [e for e in expected if isinstance(e, str)]
    if failed:
        assert isinstance(outcome, grpc.RpcError), outcome
        assert outcome.code() == grpc.StatusCode.INTERNAL and outcome.details() == failed[0]
    else:
        assert outcome == pytest.approx(expected)
