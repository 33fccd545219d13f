"""The gateway against real services: the `openai` client, SSE streaming, feedback relayed
through the real Feedback service into the real Kafka broker, auth, tenancy and limits."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import httpx
import openai
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from kafka import KafkaConsumer

from tuneloop.common.kafka import FEEDBACK_TOPIC
from tuneloop.common.tiny_models import make_tiny
from tuneloop.common.processes import ServiceProcess
from tuneloop.gateway.auth import ACCESS, ROLES, ApiKey, KeyStore, authorize, hash_key
from tuneloop.gateway.errors import ApiError
from tuneloop.v1 import feedback_pb2

KEYS = {"acme-app": ("acme", ["app"]), "globex-app": ("globex", ["app"]), "acme-annotator": ("acme", ["annotator"])}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, kafka_bootstrap: str):
    root = tmp_path_factory.mktemp("gateway")
    make_tiny(root / "models")
    keys_file = root / "keys.yaml"
    keys_file.write_text(json.dumps([{"sha256": hash_key(k), "tenant": t, "roles": r, "name": k}
                                     for k, (t, r) in KEYS.items()]))
    env = {"TUNELOOP_KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap, "TUNELOOP_GENERATION_ENGINE": "transformers",
           "TUNELOOP_REGISTRY_ROOT": str(root / "registry"), "TUNELOOP_STORE_ROOT": str(root / "store")}
    gen = ServiceProcess("generation", ["--model", str(root / "models" / "policy")], env, root).start()
    fb = ServiceProcess("feedback", [], env, root).start()
    gw_env = {**env, "TUNELOOP_GATEWAY_API_KEYS_FILE": str(keys_file),
              "TUNELOOP_GATEWAY_GENERATION_TARGET": gen.target, "TUNELOOP_GATEWAY_FEEDBACK_TARGET": fb.target,
              "TUNELOOP_GATEWAY_RATE_LIMIT_PER_MINUTE": "100000", "TUNELOOP_GATEWAY_TENANT_TOKENS_PER_MINUTE": "10000000",
              "TUNELOOP_GATEWAY_MAX_BODY_BYTES": "65536", "TUNELOOP_GATEWAY_API_DOCS": "true"}
    gw = ServiceProcess("gateway", [], gw_env, root, http=True).start()
    try:
        yield {"url": f"http://{gw.target}", "metrics": f"http://127.0.0.1:{gw.metrics_port}/metrics",
               "bootstrap": kafka_bootstrap, "root": root}
    finally:
        for p in (gw, fb, gen):
            p.stop()


def client(stack, key: str = "acme-app") -> openai.OpenAI:
    return openai.OpenAI(base_url=stack["url"] + "/v1", api_key=key, max_retries=0)


MESSAGES = [{"role": "user", "content": "Say something."}]


def test_chat_completion_with_openai_client(stack) -> None:
    resp = client(stack).chat.completions.create(model="production", messages=MESSAGES, max_tokens=8,
                                                 temperature=0)
    assert resp.id.startswith("cmpl-")
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].finish_reason in {"stop", "length"}
    assert resp.usage.completion_tokens >= 1 and resp.usage.prompt_tokens > 0
    assert resp.choices[0].model_extra["completion_id"] == resp.id


def test_streaming_matches_unary_under_greedy(stack) -> None:
    c = client(stack)
    unary = c.chat.completions.create(model="production", messages=MESSAGES, max_tokens=12, temperature=0)
    stream = c.chat.completions.create(model="production", messages=MESSAGES, max_tokens=12, temperature=0,
                                       stream=True)
    chunks = list(stream)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == unary.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason in {"stop", "length"}
    assert len({ch.id for ch in chunks}) == 1 and chunks[0].id.startswith("cmpl-")


def test_n2_gives_two_distinct_completion_ids(stack) -> None:
    resp = client(stack).chat.completions.create(model="production", messages=MESSAGES, max_tokens=6, n=2,
                                                 temperature=1.0, seed=3)
    ids = [c.model_extra["completion_id"] for c in resp.choices]
    assert len(ids) == 2 and len(set(ids)) == 2 and resp.id == ids[0]


def test_errors_surface_as_openai_exception_types(stack) -> None:
    with pytest.raises(openai.AuthenticationError):
        client(stack, key="wrong").chat.completions.create(model="production", messages=MESSAGES)
    with pytest.raises(openai.UnprocessableEntityError) as err:
        client(stack).chat.completions.create(model="production", messages=MESSAGES, temperature=5)
    assert err.value.body["param"] == "temperature"
    with pytest.raises(openai.PermissionDeniedError):  # an annotator key cannot call the app API
        client(stack, key="acme-annotator").chat.completions.create(model="production", messages=MESSAGES)


def _feedback(stack, body, key="acme-app") -> httpx.Response:
    return httpx.post(stack["url"] + "/v1/feedback", json=body, headers={"Authorization": f"Bearer {key}"},
                      timeout=30)


def test_feedback_relayed_into_kafka_and_tenancy_enforced(stack) -> None:
    c = client(stack)
    pair = c.chat.completions.create(model="production", messages=MESSAGES, max_tokens=6, n=2, temperature=1.0)
    a, b = (ch.model_extra["completion_id"] for ch in pair.choices)
    event_id = uuid.uuid4().hex
    ok = _feedback(stack, {"type": "pairwise", "completion_ids": [a, b], "choice": "tie", "event_id": event_id,
                           "user": "u1"})
    assert ok.status_code == 200, ok.text
    assert ok.json()["results"][0]["status"] == "accepted"
    assert _feedback(stack, {"type": "pairwise", "completion_ids": [a, b], "choice": "tie",
                             "event_id": event_id}).json()["results"][0]["status"] == "duplicate"

    foreign = _feedback(stack, {"type": "thumbs", "completion_id": a, "thumbs_up": True}, key="globex-app")
    assert foreign.status_code == 403

    consumer = KafkaConsumer(FEEDBACK_TOPIC, bootstrap_servers=stack["bootstrap"], auto_offset_reset="earliest",
                             consumer_timeout_ms=10_000)
    events = [feedback_pb2.FeedbackEvent.FromString(m.value) for m in consumer]
    consumer.close()
    mine = [e for e in events if e.event_id == event_id]
    assert len(mine) == 1
    assert mine[0].tenant == "acme" and mine[0].pairwise.choice == feedback_pb2.PAIRWISE_CHOICE_TIE


def test_annotator_feedback_is_marked_as_annotator(stack) -> None:
    event_id = uuid.uuid4().hex
    r = _feedback(stack, {"type": "rating", "completion_id": "cmpl-" + "2" * 32, "score": 3, "event_id": event_id},
                  key="acme-annotator")
    assert r.status_code == 200, r.text
    consumer = KafkaConsumer(FEEDBACK_TOPIC, bootstrap_servers=stack["bootstrap"], auto_offset_reset="earliest",
                             consumer_timeout_ms=10_000)
    events = [feedback_pb2.FeedbackEvent.FromString(m.value) for m in consumer]
    consumer.close()
    (mine,) = [e for e in events if e.event_id == event_id]
    assert mine.source == feedback_pb2.FEEDBACK_SOURCE_ANNOTATOR and mine.annotator_id == "acme-annotator"


def _events_by_id(stack, *event_ids: str) -> dict[str, feedback_pb2.FeedbackEvent]:
    consumer = KafkaConsumer(FEEDBACK_TOPIC, bootstrap_servers=stack["bootstrap"], auto_offset_reset="earliest",
                             consumer_timeout_ms=10_000)
    events = {e.event_id: e for e in (feedback_pb2.FeedbackEvent.FromString(m.value) for m in consumer)}
    consumer.close()
    return {i: events[i] for i in event_ids if i in events}


def test_an_annotator_key_cannot_judge_as_another_annotator(stack) -> None:
    """Attacker: a valid annotator key posting as the tenant's gold annotator."""
    judgement = {"type": "rating", "completion_id": "cmpl-" + "3" * 32, "score": 5, "event_id": uuid.uuid4().hex}
    r = _feedback(stack, {**judgement, "user": "gold-annotator"}, key="acme-annotator")
    assert r.status_code == 403 and r.json()["error"]["param"] == "user", r.text
    honest = uuid.uuid4().hex
    batch = _feedback(stack, {"events": [{**judgement, "event_id": honest}, {**judgement, "user": "gold-annotator"}]},
                      key="acme-annotator")
    assert batch.status_code == 403, "one forged event refuses the request"
    own = _feedback(stack, {**judgement, "user": "acme-annotator"}, key="acme-annotator")
    assert own.status_code == 200, own.text
    sent = _events_by_id(stack, honest, judgement["event_id"])
    assert list(sent) == [judgement["event_id"]], "nothing of the refused request was sent"
    assert sent[judgement["event_id"]].annotator_id == "acme-annotator"


@pytest.mark.parametrize("mark", ["calibration", "anchor"])
def test_an_app_key_cannot_mark_calibration_or_anchor_items(stack, mark: str) -> None:
    r = _feedback(stack, {"type": "rating", "completion_id": "cmpl-" + "4" * 32, "score": 5, mark: True})
    assert r.status_code == 403 and r.json()["error"]["param"] == mark, r.text


def test_an_apps_end_users_are_recorded_as_end_users_never_as_annotators(stack) -> None:
    """Attacker: an app key naming its end user like one of the tenant's annotators."""
    event_id = uuid.uuid4().hex
    r = _feedback(stack, {"type": "rating", "completion_id": "cmpl-" + "5" * 32, "score": 5, "event_id": event_id,
                          "user": "acme-annotator"})
    assert r.status_code == 200, r.text
    mine = _events_by_id(stack, event_id)[event_id]
    assert mine.source == feedback_pb2.FEEDBACK_SOURCE_END_USER and mine.tenant == "acme"
    assert mine.annotator_id == "end-user:acme-annotator"


def test_feedback_batch_reports_each_event(stack) -> None:
    good = {"type": "rating", "completion_id": "cmpl-" + "0" * 32, "score": 4}
    bad = {"type": "rating", "completion_id": "cmpl-" + "1" * 32, "score": 9}
    r = _feedback(stack, {"events": [good, bad]})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["status"] for x in results] == ["accepted", "rejected"]
    assert results[1]["field"] == "score"
    single = _feedback(stack, bad)
    assert single.status_code == 422 and single.json()["error"]["param"] == "score"


def test_request_body_over_the_limit_is_413(stack) -> None:
    huge = [{"role": "user", "content": "x" * 30000}] * 3
    r = httpx.post(stack["url"] + "/v1/chat/completions", json={"messages": huge},
                   headers={"Authorization": "Bearer acme-app"}, timeout=30)
    assert r.status_code == 413
    assert "Traceback" not in r.text


def test_models_health_and_metrics(stack) -> None:
    models = client(stack).models.list()
    assert models.data and models.data[0].id.startswith("policy@") or models.data[0].id
    assert httpx.get(stack["url"] + "/readyz", timeout=10).json()["ready"] is True
    body = httpx.get(stack["metrics"], timeout=10).text
    assert 'tuneloop_gateway_requests_total{route="/v1/chat/completions",status="200"}' in body
    # Not on the public port: the API port's NetworkPolicy is open to clients, not to scrapers.
    assert httpx.get(stack["url"] + "/metrics", timeout=10).status_code == 404


def test_api_docs_are_off_unless_asked_for(tmp_path: Path) -> None:
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps([{"sha256": hash_key("k"), "tenant": "t", "roles": ["app"]}]))
    env = {"TUNELOOP_GATEWAY_API_KEYS_FILE": str(keys), "TUNELOOP_GATEWAY_GENERATION_TARGET": "127.0.0.1:9"}
    with ServiceProcess("gateway", [], env, tmp_path, http=True) as gw:
        codes = {path: httpx.get(f"http://{gw.target}{path}", timeout=10).status_code
                 for path in ("/openapi.json", "/docs", "/redoc", "/metrics")}
    assert codes == {"/openapi.json": 404, "/docs": 404, "/redoc": 404, "/metrics": 404}


def test_rate_limit_is_429_with_retry_after(stack, tmp_path: Path) -> None:
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps([{"sha256": hash_key("k"), "tenant": "t", "roles": ["app"]}]))
    # Backends are irrelevant: the limit is checked before any call is relayed.
    env = {"TUNELOOP_GATEWAY_API_KEYS_FILE": str(keys), "TUNELOOP_GATEWAY_RATE_LIMIT_PER_MINUTE": "2",
           "TUNELOOP_GATEWAY_GENERATION_TARGET": "127.0.0.1:9"}
    with ServiceProcess("gateway", [], env, tmp_path, http=True) as gw:
        codes = [httpx.get(f"http://{gw.target}/v1/models", headers={"Authorization": "Bearer k"}, timeout=10)
                 for _ in range(4)]
    statuses = [r.status_code for r in codes]
    assert 429 not in statuses[:2], statuses
    # The sliding-window counter weighs the previous minute by the share of it still in the
    # window, so requests that straddle a minute boundary may admit one more (2 x 0.99 + 0 < 2);
    # by the fourth the limit holds whenever the requests were sent.
    refused = next((r for r in codes[2:] if r.status_code == 429), None)
    assert refused is not None, statuses
    assert int(refused.headers["Retry-After"]) >= 1 and refused.json()["error"]["code"] == "requests_limit"


def test_a_failed_backend_reaches_clients_as_a_stable_message_without_internals(tmp_path: Path) -> None:
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps([{"sha256": hash_key("k"), "tenant": "t", "roles": ["app"]}]))
    env = {"TUNELOOP_GATEWAY_API_KEYS_FILE": str(keys), "TUNELOOP_GATEWAY_GENERATION_TARGET": "127.0.0.1:9"}
    with ServiceProcess("gateway", [], env, tmp_path, http=True) as gw:
        r = httpx.post(f"http://{gw.target}/v1/chat/completions", headers={"Authorization": "Bearer k"}, timeout=60,
                       json={"model": "production", "messages": MESSAGES})
        logged = gw.log_tail()
    assert r.status_code == 503, r.text
    message, request_id = r.json()["error"]["message"], r.headers["X-Request-Id"]
    assert message == f"the model backend is unavailable; retry later (request {request_id})"
    assert "127.0.0.1" in logged and request_id in logged, "the details are in the log, under the request id"


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_no_5xx_for_generated_requests(stack, mode: str) -> None:
    """schemathesis against the gateway's own OpenAPI spec, with a valid key: never a 5xx,
    for valid requests and for requests that break the schema."""
    from hypothesis import given
    from schemathesis import GenerationMode

    from hypothesis.errors import Unsatisfiable

    schema = schemathesis.openapi.from_url(stack["url"] + "/openapi.json")
    exercised = 0
    for result in schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy(generation_mode=GenerationMode(mode)))
        @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
        def check(case) -> None:
            if isinstance(case.body, dict):  # keep generation short: the limits are tested elsewhere
                for name in ("max_tokens", "max_completion_tokens"):
                    if isinstance(case.body.get(name), int):
                        case.body[name] = max(1, min(case.body[name], 8))
            response = case.call(headers={"Authorization": "Bearer acme-app"}, timeout=60)
            assert response.status_code < 500, (
                f"{case.method} {case.path}: {response.status_code} {response.text[:300]}")

        try:
            check()
        except Unsatisfiable:  # an operation with nothing to break (no parameters, no body)
            assert mode == "negative", operation.label
            continue
        exercised += 1
    assert exercised >= (5 if mode == "positive" else 3)  # negative: the operations with a body


def test_each_role_reaches_exactly_its_kinds_of_call() -> None:
    store = KeyStore({hash_key(r): ApiKey(r, "acme", frozenset({r}), hash_key(r)) for r in ROLES})

    def allowed(role: str, call: str) -> bool:
        try:
            return authorize(store, f"Bearer {role}", call).name == role
        except ApiError as err:
            assert err.status == 403 and err.type == "permission_error"
            return False

    reach = {role: {call for call in ACCESS if allowed(role, call)} for role in ROLES}
    # A lead does what app and annotator keys do; an operator sees the workbench as a lead
    # does and alone moves an alias; neither operators nor annotators use the public API's models.
    assert reach == {
        "app": {"complete", "feedback"},
        "annotator": {"feedback", "annotate"},
        "lead": {"complete", "feedback", "annotate", "review", "erase"},
        "operator": {"annotate", "review", "move"},
    }
    for header in (None, "", "Bearer", "Bearer nope", "lead"):
        with pytest.raises(ApiError) as caught:
            authorize(store, header, "complete")
        assert caught.value.status == 401
