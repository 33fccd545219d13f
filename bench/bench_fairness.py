"""Noisy neighbour: tenant A's chat-completion latency alone, and while tenant B floods the
same gateway and Generation with the largest requests it is allowed, with and without the
per-tenant limits, in one run.

One Generation process (transformers engine, the tiny seeded model) serves two gateways side
by side: one with the tenant limits of the run (`--max-concurrent` generations per tenant,
`--tokens-per-minute`), one with limits too high to matter. A sends short greedy requests one
after another; B runs `--flood` clients that each send max_tokens=`--flood-max-tokens` requests
back to back (after a refusal they retry 50 ms later, as an impatient client does).

    .venv/bin/python bench/bench_fairness.py [--requests 30] [--flood 12] [--json PATH]

Prints A's p50/p99 per phase and the ratios to A alone, then the results as one JSON object
on the last line (and in PATH with --json).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
from bench_gateway import broker_at, summary_ms
from rich.console import Console
from rich.table import Table

from tuneloop.common.tiny_models import make_tiny
from tuneloop.common.processes import ServiceProcess
from tuneloop.gateway.auth import hash_key

KEYS = {"a-key": "tenant-a", "b-key": "tenant-b"}
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


@contextlib.contextmanager
def services(work: Path, bootstrap: str, max_concurrent: int, tokens_per_minute: int) -> Iterator[dict[str, str]]:
    """Generation and two gateways in front of it; yields {"limited": url, "unlimited": url}."""
    policy, _reward = make_tiny(work / "models")
    keys = work / "keys.json"
    keys.write_text(json.dumps([{"sha256": hash_key(k), "tenant": t, "roles": ["app"]} for k, t in KEYS.items()]))
    env = {
        "TUNELOOP_KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "TUNELOOP_GENERATION_ENGINE": "transformers",
        "TUNELOOP_GENERATION_SPOOL_PATH": str(work / "completions.spool"),
        "TUNELOOP_REGISTRY_ROOT": str(work / "registry"),
        "TUNELOOP_GENERATION_TORCH_THREADS": "1",
    }
    with ServiceProcess("generation", ["--model", str(policy)], env, work) as generation:
        common = {"TUNELOOP_GATEWAY_API_KEYS_FILE": str(keys), "TUNELOOP_GATEWAY_GENERATION_TARGET": generation.target,
                  "TUNELOOP_GATEWAY_FEEDBACK_TARGET": "127.0.0.1:9", "TUNELOOP_GATEWAY_RATE_LIMIT_PER_MINUTE": "1000000"}
        limited = {**common, "TUNELOOP_GATEWAY_TENANT_MAX_CONCURRENT": str(max_concurrent),
                   "TUNELOOP_GATEWAY_TENANT_TOKENS_PER_MINUTE": str(tokens_per_minute)}
        unlimited = {**common, "TUNELOOP_GATEWAY_TENANT_MAX_CONCURRENT": "100000",
                     "TUNELOOP_GATEWAY_TENANT_TOKENS_PER_MINUTE": "1000000000"}
        with (
            ServiceProcess("gateway", [], limited, work, http=True) as gw_limited,
            ServiceProcess("gateway", [], unlimited, work, http=True) as gw_unlimited,
        ):
            yield {"limited": f"http://{gw_limited.target}", "unlimited": f"http://{gw_unlimited.target}"}


def tenant_a(url: str, requests: int, max_tokens: int) -> list[float]:
    body = {"model": "production", "messages": MESSAGES, "max_tokens": max_tokens, "temperature": 0}
    times = []
    with httpx.Client(base_url=url, headers={"Authorization": "Bearer a-key"}, timeout=600) as client:
        for _ in range(requests):
            start = time.perf_counter()
            client.post("/v1/chat/completions", json=body).raise_for_status()
            times.append(time.perf_counter() - start)
    return times


@contextlib.contextmanager
def flood(url: str, clients: int, max_tokens: int) -> Iterator[dict[str, int]]:
    """Tenant B's clients, sending until the block ends; counts what the gateway answered."""
    stop = threading.Event()
    counts = {"served": 0, "refused": 0}
    body = {"model": "production", "messages": MESSAGES, "max_tokens": max_tokens, "temperature": 1.0}

    def run() -> None:
        with httpx.Client(base_url=url, headers={"Authorization": "Bearer b-key"}, timeout=600) as client:
            while not stop.is_set():
                status = client.post("/v1/chat/completions", json=body).status_code
                counts["served" if status == 200 else "refused"] += 1
                if status == 429:
                    stop.wait(0.05)

    threads = [threading.Thread(target=run, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    time.sleep(2.0)  # the flood is under way before A is measured
    try:
        yield counts
    finally:
        stop.set()
        for t in threads:
            t.join(600)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=30, help="tenant A's requests per phase")
    parser.add_argument("--max-tokens", type=int, default=16, help="tenant A's max_tokens")
    parser.add_argument("--flood", type=int, default=12, help="tenant B's concurrent clients")
    parser.add_argument("--flood-max-tokens", type=int, default=1024, help="tenant B's max_tokens (the cap)")
    parser.add_argument("--max-concurrent", type=int, default=2, help="per-tenant concurrent generations")
    parser.add_argument("--tokens-per-minute", type=int, default=200_000, help="per-tenant tokens per minute")
    parser.add_argument("--bootstrap", help="use this Kafka broker instead of starting one")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    args = parser.parse_args()

    phases: dict[str, list[float]] = {}
    floods: dict[str, dict[str, int]] = {}
    with (
        tempfile.TemporaryDirectory(prefix="bench-fairness-") as tmp,
        broker_at(args.bootstrap) as bootstrap,
        services(Path(tmp), bootstrap, args.max_concurrent, args.tokens_per_minute) as urls,
    ):
        tenant_a(urls["limited"], 5, args.max_tokens)  # warm-up
        phases["alone"] = tenant_a(urls["limited"], args.requests, args.max_tokens)
        for kind in ("unlimited", "limited"):
            with flood(urls[kind], args.flood, args.flood_max_tokens) as counts:
                phases[f"flood_{kind}"] = tenant_a(urls[kind], args.requests, args.max_tokens)
            floods[kind] = dict(counts)

    figures = {name: summary_ms(times) for name, times in phases.items()}
    alone = figures["alone"]
    result = {
        "benchmark": "fairness",
        "tenant_a_ms": figures,
        "tenant_b_requests": floods,
        "settings": {k: getattr(args, k) for k in ("requests", "max_tokens", "flood", "flood_max_tokens",
                                                  "max_concurrent", "tokens_per_minute")},
        "ratios": [
            {"name": f"tenant A {q} under flood / alone, {label}",
             "value": round(figures[f"flood_{kind}"][f"{q}_ms"] / alone[f"{q}_ms"], 2)}
            for kind, label in (("limited", "with tenant limits"), ("unlimited", "without"))
            for q in ("p50", "p99")
        ],
    }
    table = Table(title="tenant A latency (ms)")
    for col in ("phase", "p50", "p99", "mean", "B served", "B refused"):
        table.add_column(col)
    for name, f in figures.items():
        b = floods.get(name.removeprefix("flood_"), {})
        table.add_row(name, f"{f['p50_ms']:.1f}", f"{f['p99_ms']:.1f}", f"{f['mean_ms']:.1f}",
                      str(b.get("served", "")), str(b.get("refused", "")))
    Console().print(table)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
