"""Fair serving: per-key request and per-tenant token and concurrency limits that two gateway
replicas enforce together through a real Redis, and generation cancelled when its client leaves."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from pathlib import Path

import httpx
import pytest

from tuneloop.common.tiny_models import make_tiny
from tuneloop.common.processes import ServiceProcess
from tuneloop.gateway.auth import hash_key
from tuneloop.gateway.quotas import LIMITER_ERRORS, Limited, QuotaLimits, Quotas

from tests.support.redis_server import RedisServer

KEYS = {"acme-app": "acme", "globex-app": "globex"}
MESSAGES = [{"role": "user", "content": "Say something."}]


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory):
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def generation(tmp_path_factory: pytest.TempPathFactory, kafka_bootstrap: str):
    root = tmp_path_factory.mktemp("limits")
    make_tiny(root / "models")
    env = {"TUNELOOP_KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap, "TUNELOOP_GENERATION_ENGINE": "transformers",
           "TUNELOOP_REGISTRY_ROOT": str(root / "registry"), "TUNELOOP_GENERATION_TORCH_THREADS": "1",
           # One sequence at a time: a long answer keeps the engine busy, which is what these tests need.
           "TUNELOOP_GENERATION_MAX_BATCH_SIZE": "1"}
    with ServiceProcess("generation", ["--model", str(root / "models" / "policy")], env, root) as gen:
        yield gen, root


def replicas(generation, redis_server: RedisServer, tmp: Path, count: int = 2, **limits: str) -> list[ServiceProcess]:
    gen, _ = generation
    keys = tmp / "keys.json"
    keys.write_text(json.dumps([{"sha256": hash_key(k), "tenant": t, "roles": ["app"]} for k, t in KEYS.items()]))
    env = {"TUNELOOP_GATEWAY_API_KEYS_FILE": str(keys), "TUNELOOP_GATEWAY_GENERATION_TARGET": gen.target,
           "TUNELOOP_GATEWAY_FEEDBACK_TARGET": "127.0.0.1:9", "TUNELOOP_GATEWAY_LIMITS_STORAGE_URL": redis_server.url,
           **{f"TUNELOOP_GATEWAY_{k.upper()}": v for k, v in limits.items()}}
    # The tests share one Redis: each starts from empty counts.
    import redis

    redis.Redis.from_url(redis_server.url).flushdb()
    return [ServiceProcess("gateway", [], env, tmp, http=True).start() for _ in range(count)]


def chat(gw: ServiceProcess, key: str, timeout: float = 120, **body) -> httpx.Response:
    payload = {"model": "production", "messages": MESSAGES, "temperature": 0, **body}
    return httpx.post(f"http://{gw.target}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                      json=payload, timeout=timeout)


def test_a_tenants_token_budget_is_shared_by_two_replicas(generation, redis_server, tmp_path: Path) -> None:
    a, b = replicas(generation, redis_server, tmp_path, tenant_tokens_per_minute="1000")
    try:
        # Each request is charged up front at its prompt estimate plus max_tokens (400): two fit in
        # 1000 tokens, whichever replica serves them; the third does not, on either replica.
        assert chat(a, "acme-app", max_tokens=400).status_code == 200
        assert chat(b, "acme-app", max_tokens=400).status_code == 200
        third = chat(a, "acme-app", max_tokens=400)
        assert third.status_code == 429, third.text
        assert third.json()["error"]["code"] == "tokens_limit" and int(third.headers["Retry-After"]) >= 1
        # Another tenant has a budget of its own.
        assert chat(b, "globex-app", max_tokens=400).status_code == 200
        # A request that could never fit says so, instead of a Retry-After that would not help.
        never = chat(b, "globex-app", max_tokens=4000, n=1)
        assert never.status_code == 429 and "over the tenant's budget" in never.json()["error"]["message"]
    finally:
        for gw in (a, b):
            gw.stop()


def test_a_tenants_concurrent_generations_are_limited_across_replicas(generation, redis_server, tmp_path) -> None:
    a, b = replicas(generation, redis_server, tmp_path, tenant_max_concurrent="1")
    results: dict[str, httpx.Response] = {}

    def call(name: str, gw: ServiceProcess, key: str) -> None:
        results[name] = chat(gw, key, max_tokens=1000)

    try:
        threads = [threading.Thread(target=call, args=(f"acme-{i}", gw, "acme-app")) for i, gw in enumerate((a, b, a, b))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        codes = sorted(r.status_code for r in results.values())
        refused = [r for r in results.values() if r.status_code == 429]
        # Four at once, one slot for the tenant across both replicas: most are refused.
        assert codes.count(200) >= 1 and len(refused) >= 2, codes
        assert all(r.json()["error"]["code"] == "concurrency_limit" for r in refused)
        # The slots were given back when the calls ended.
        assert chat(b, "acme-app", max_tokens=4).status_code == 200
    finally:
        for gw in (a, b):
            gw.stop()


def _metric(port: int, name: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    found = re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.MULTILINE)
    return sum(float(v) for v in found)


def test_a_client_that_leaves_cancels_its_generation(generation, redis_server, tmp_path: Path) -> None:
    gen, _ = generation
    (gw,) = replicas(generation, redis_server, tmp_path, count=1)
    try:
        tokens = "tuneloop_generation_tokens_generated_total"
        started = time.monotonic()
        full = chat(gw, "acme-app", max_tokens=1000)
        took = time.monotonic() - started
        full_tokens = full.json()["usage"]["completion_tokens"]
        assert full_tokens > 200, "the tiny model must give a long answer for this test to mean anything"
        before = _metric(gen.metrics_port, tokens)
        with pytest.raises(httpx.ReadTimeout):
            chat(gw, "acme-app", max_tokens=1000, timeout=took / 5)
        time.sleep(1.0)
        settled = _metric(gen.metrics_port, tokens)
        time.sleep(took)
        # Nothing more was generated after the client left, and far less than the full answer.
        assert _metric(gen.metrics_port, tokens) == settled
        assert settled - before < full_tokens * 0.8, (settled - before, full_tokens)
    finally:
        gw.stop()


def _quotas(url: str, ttl_s: float = 60.0, concurrent: int = 1) -> Quotas:
    return Quotas(QuotaLimits(requests_per_minute=1000, tenant_tokens_per_minute=1000,
                              tenant_max_concurrent=concurrent, lease_ttl_s=ttl_s), url)


def test_a_dead_replicas_slots_come_back_at_their_deadline(redis_server) -> None:
    import redis

    redis.Redis.from_url(redis_server.url).flushdb()

    async def scenario() -> None:
        dying, survivor = _quotas(redis_server.url, ttl_s=1.0), _quotas(redis_server.url)
        held = dying.generation_slot("acme")
        await held.__aenter__()  # and never leaves: the replica died mid-request
        with pytest.raises(Limited):
            async with survivor.generation_slot("acme"):
                pass
        async with survivor.generation_slot("globex"):
            pass
        await asyncio.sleep(1.5)
        async with survivor.generation_slot("acme"):
            pass
        await dying.close()
        await survivor.close()

    asyncio.run(scenario())


def test_an_unreachable_limit_store_serves_unlimited_and_counts_it() -> None:
    async def scenario() -> None:
        quotas = _quotas("redis://127.0.0.1:9/0")
        before = LIMITER_ERRORS._value.get()
        for _ in range(3):
            await quotas.admit_request("key", "acme")
            await quotas.charge_tokens("acme", 900)
            async with quotas.generation_slot("acme"):
                pass
        assert LIMITER_ERRORS._value.get() - before >= 9
        await quotas.close()

    asyncio.run(scenario())
