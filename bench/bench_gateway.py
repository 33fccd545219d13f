"""Latency the gateway adds: the same chat completion via gRPC to Generation directly and via
the gateway's OpenAI-compatible HTTP API, interleaved, in one run.

Both paths reach one Generation process (transformers engine, the tiny seeded model, greedy,
a few tokens), so the model's own time is the same on both and the difference is the
gateway: HTTP parsing, API-key check and rate limiter, JSON <-> protobuf, one more hop. Each
round sends one request on each path, alternating which goes first; both keep their
connection open (a gRPC channel, an HTTP keep-alive client), as real clients do.

    .venv/bin/python bench/bench_gateway.py [--requests 200] [--max-tokens 4] [--json PATH]

Prints a table of p50/p90/p99/mean per path with the gateway/direct ratios, then the results
as one JSON object on the last line (and in PATH with --json). Without --bootstrap it starts a
Kafka broker of its own (Generation logs every completion there) and stops it at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import httpx
from rich.console import Console
from rich.table import Table

from tuneloop.common.local_kafka import LocalBroker, install
from tuneloop.common.tiny_models import make_tiny
from tuneloop.common.processes import ServiceProcess
from tuneloop.gateway.auth import hash_key
from tuneloop.v1 import completion_pb2, generation_pb2, generation_pb2_grpc

API_KEY = "bench-key"
TENANT = "bench"
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def summary_ms(seconds: list[float]) -> dict[str, float]:
    ms = [s * 1000 for s in seconds]
    return {
        "p50_ms": round(percentile(ms, 50), 3),
        "p90_ms": round(percentile(ms, 90), 3),
        "p99_ms": round(percentile(ms, 99), 3),
        "mean_ms": round(statistics.fmean(ms), 3),
        "min_ms": round(min(ms), 3),
    }


@contextlib.contextmanager
def broker_at(bootstrap: str | None) -> Iterator[str]:
    if bootstrap:
        yield bootstrap
        return
    with (
        tempfile.TemporaryDirectory(prefix="bench-gateway-kafka-") as tmp,
        LocalBroker(Path(tmp), home=install()) as broker,
    ):
        yield broker.bootstrap


@contextlib.contextmanager
def services(work: Path, bootstrap: str) -> Iterator[tuple[str, str]]:
    """Generation and the gateway in front of it; yields (gRPC target, gateway base URL)."""
    policy, _reward = make_tiny(work / "models")
    keys = work / "keys.json"
    keys.write_text(json.dumps([{"sha256": hash_key(API_KEY), "tenant": TENANT, "roles": ["app"], "name": "bench"}]))
    env = {
        "TUNELOOP_KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "TUNELOOP_GENERATION_ENGINE": "transformers",
        "TUNELOOP_GENERATION_SPOOL_PATH": str(work / "completions.spool"),
        "TUNELOOP_REGISTRY_ROOT": str(work / "registry"),
        # One torch thread: the model's time is the same on both paths, and a second spinning
        # thread would only compete with the gateway and the client for the cores.
        "TUNELOOP_GENERATION_TORCH_THREADS": "1",
    }
    with ServiceProcess("generation", ["--model", str(policy)], env, work) as generation:
        gateway_env = {
            **env,
            "TUNELOOP_GATEWAY_API_KEYS_FILE": str(keys),
            "TUNELOOP_GATEWAY_GENERATION_TARGET": generation.target,
            # Never called here; the gateway needs an address for it all the same.
            "TUNELOOP_GATEWAY_FEEDBACK_TARGET": "127.0.0.1:9",
            # The limiter must not throttle the benchmark (its check still runs on every request).
            "TUNELOOP_GATEWAY_RATE_LIMIT_PER_MINUTE": "1000000",
            "TUNELOOP_GATEWAY_TENANT_TOKENS_PER_MINUTE": "1000000000",
            "TUNELOOP_GATEWAY_TENANT_MAX_CONCURRENT": "1000",
        }
        with ServiceProcess("gateway", [], gateway_env, work, http=True) as gateway:
            yield generation.target, f"http://{gateway.target}"


def direct_call(target: str, max_tokens: int) -> tuple[Callable[[], str], Callable[[], None]]:
    """A request the way the gateway builds it, sent over one long-lived channel."""
    channel = grpc.insecure_channel(target)
    stub = generation_pb2_grpc.GenerationStub(channel)
    request = generation_pb2.GenerateRequest(
        prompt=completion_pb2.Prompt(
            chat=completion_pb2.Conversation(messages=[completion_pb2.ChatMessage(**m) for m in MESSAGES])
        ),
        sampling=completion_pb2.SamplingParams(n=1, temperature=0.0, max_tokens=max_tokens),
        model="production",
        tenant=TENANT,
    )

    def call() -> str:
        return stub.Generate(request, timeout=60).completions[0].text

    return call, channel.close


def gateway_call(base_url: str, max_tokens: int) -> tuple[Callable[[], str], Callable[[], None]]:
    client = httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
    body = {"model": "production", "messages": MESSAGES, "max_tokens": max_tokens, "temperature": 0}

    def call() -> str:
        resp = client.post("/v1/chat/completions", json=body)
        resp.raise_for_status()
        return resp.json()["choices"][0]["message"]["content"]

    return call, client.close


def measure(paths: dict[str, Callable[[], str]], requests: int, warmup: int) -> tuple[dict[str, list[float]], int]:
    """Seconds per request on each path, rounds interleaved; and how many rounds' answers differed."""
    names = list(paths)
    for _ in range(warmup):
        for name in names:
            paths[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    mismatches = 0
    for i in range(requests):
        answers = {}
        # Alternate which path goes first, so neither always meets a warmer (or busier) server.
        for name in names if i % 2 == 0 else reversed(names):
            start = time.perf_counter()
            answers[name] = paths[name]()
            times[name].append(time.perf_counter() - start)
        mismatches += len(set(answers.values())) > 1
    return times, mismatches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200, help="requests per path (after warm-up)")
    parser.add_argument("--warmup", type=int, default=20, help="unmeasured requests per path first")
    parser.add_argument("--max-tokens", type=int, default=4, help="greedy tokens per answer")
    parser.add_argument("--bootstrap", help="use this Kafka broker instead of starting one")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    args = parser.parse_args()

    with (
        tempfile.TemporaryDirectory(prefix="bench-gateway-") as tmp,
        broker_at(args.bootstrap) as bootstrap,
        services(Path(tmp), bootstrap) as (target, base_url),
    ):
        direct, close_direct = direct_call(target, args.max_tokens)
        gateway, close_gateway = gateway_call(base_url, args.max_tokens)
        try:
            times, mismatches = measure({"direct": direct, "gateway": gateway}, args.requests, args.warmup)
        finally:
            close_direct()
            close_gateway()

    direct_s, gateway_s = summary_ms(times["direct"]), summary_ms(times["gateway"])
    overhead = [g - d for g, d in zip(times["gateway"], times["direct"], strict=True)]
    result = {
        "benchmark": "gateway",
        "setup": {
            "requests_per_path": args.requests,
            "warmup_per_path": args.warmup,
            "max_tokens": args.max_tokens,
            "model": "tiny seeded LlamaForCausalLM, transformers engine, greedy",
        },
        "direct": direct_s,
        "gateway": gateway_s,
        "added_ms": {
            "p50": round(gateway_s["p50_ms"] - direct_s["p50_ms"], 3),
            "p99": round(gateway_s["p99_ms"] - direct_s["p99_ms"], 3),
            "median_of_round_differences": round(statistics.median(overhead) * 1000, 3),
        },
        "answer_mismatches": mismatches,
        "ratios": [
            {"name": "gateway/direct latency p50", "value": round(gateway_s["p50_ms"] / direct_s["p50_ms"], 3),
             "numerator": f"{gateway_s['p50_ms']:.2f} ms", "denominator": f"{direct_s['p50_ms']:.2f} ms"},
            {"name": "gateway/direct latency p99", "value": round(gateway_s["p99_ms"] / direct_s["p99_ms"], 3),
             "numerator": f"{gateway_s['p99_ms']:.2f} ms", "denominator": f"{direct_s['p99_ms']:.2f} ms"},
        ],
    }

    table = Table(title=f"Chat completion latency, {args.requests} interleaved requests per path, "
                        f"max_tokens={args.max_tokens}, greedy")
    for column in ("path", "p50 ms", "p90 ms", "p99 ms", "mean ms", "min ms"):
        table.add_column(column, justify="left" if column == "path" else "right")
    for name, s in (("gRPC direct", direct_s), ("gateway (HTTP)", gateway_s)):
        table.add_row(name, *(f"{s[k]:.2f}" for k in ("p50_ms", "p90_ms", "p99_ms", "mean_ms", "min_ms")))
    console = Console()
    console.print(table)
    for ratio in result["ratios"]:
        console.print(f"ratio {ratio['name']}: {ratio['value']:.3f}")
    added = result["added_ms"]
    console.print(f"added by the gateway: p50 {added['p50']:.2f} ms, p99 {added['p99']:.2f} ms, "
                  f"median per round {added['median_of_round_differences']:.2f} ms")
    if mismatches:
        console.print(f"[yellow]{mismatches} rounds got different answers on the two paths[/yellow]")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
