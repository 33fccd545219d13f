"""Reward service throughput: pairs/s scored one pair per call, in client batches, and with
many concurrent one-pair calls that the server batches dynamically.

All three go through a real Reward server on a free loopback port (gRPC, validation,
encoding, the batching thread), called from a client process of its own, one after the
other in one run, on the same pairs:

- one at a time: one client, one pair per call, batch window 0 (nothing to wait for);
- batched: one client, `--batch` pairs per call, batch window 0;
- dynamic: `--concurrency` clients, one pair per call each, batch window `--window-ms`.

The three modes run in turn `--rounds` times, and each mode's figure is its median round: on a
shared two-core machine one pass of a few seconds moves by a third from one minute to the next.
Prints pairs/s for each and the batched / one-at-a-time and dynamic / one-at-a-time ratios.

    .venv/bin/python bench/bench_reward.py [--model tiny|minilm|FOLDER] [--pairs 512] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import grpc
from tuneloop.common.registry import Registry
from tuneloop.reward.formatting import to_proto_prompt
from tuneloop.reward.server import build_server
from tuneloop.reward.settings import RewardSettings
from tuneloop.v1 import reward_pb2, reward_pb2_grpc

TOPICS = ("the sea", "a computer", "the weather", "numbers", "the sun", "cats and dogs", "a week")


def workload(n: int) -> list[reward_pb2.ScoreItem]:
    """`n` chat pairs of varied length, deterministic."""
    items = []
    for i in range(n):
        prompt = [{"role": "user", "content": f"Question {i}: can you explain {TOPICS[i % len(TOPICS)]}?"}]
        response = "It is simple. " * (1 + i % 6) + ("Thank you for your help!" if i % 2 else "That is all.")
        items.append(reward_pb2.ScoreItem(prompt=to_proto_prompt(prompt), response=response))
    return items


def model_folder(spec: str, scratch: Path) -> Path:
    if spec == "tiny":
        from tuneloop.common.tiny_models import make_tiny

        return make_tiny(scratch / "tiny")[1]
    if spec == "minilm":
        from tuneloop.common.model_import import import_minilm

        return import_minilm(scratch / "minilm")
    return Path(spec)


def timed(target: str, requests: list[bytes], concurrency: int) -> float:
    """Seconds to answer every request (serialised ScoreRequests), `concurrency` calls in flight.

    Runs in a client process of its own, as the service's callers do: client threads in the
    server's process would take the server's interpreter lock for every call they make.
    """
    parsed = [reward_pb2.ScoreRequest.FromString(r) for r in requests]
    with grpc.insecure_channel(target) as channel:
        stub = reward_pb2_grpc.RewardStub(channel)

        def call(request: reward_pb2.ScoreRequest) -> int:
            return len(stub.Score(request, timeout=600).scores)

        stub.Score(parsed[0], timeout=600)  # warm-up: first forward pass, connection
        start = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            scored = sum(pool.map(call, parsed))
        elapsed = time.perf_counter() - start
    assert scored == sum(len(r.items) for r in parsed)
    return elapsed


def run_mode(
    folder: Path,
    registry: Registry,
    requests: list[reward_pb2.ScoreRequest],
    concurrency: int,
    window_ms: float,
    args: argparse.Namespace,
) -> float:
    settings = RewardSettings(
        port=0,
        metrics_port=0,
        host="127.0.0.1",
        model=str(folder),
        device=args.device,
        torch_threads=args.threads,
        batch_window_ms=window_ms,
        max_batch_size=args.batch,
        max_request_items=args.batch,
    )
    with build_server(settings, registry) as server, ProcessPoolExecutor(1, mp_context=get_context("spawn")) as client:
        payload = [r.SerializeToString() for r in requests]
        return client.submit(timed, f"127.0.0.1:{server.port}", payload, concurrency).result()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="tiny, minilm, or a reward model folder.")
    parser.add_argument("--pairs", type=int, default=512, help="Pairs scored in each mode.")
    parser.add_argument("--batch", type=int, default=32, help="Pairs per call in the batched mode.")
    parser.add_argument("--concurrency", type=int, default=32, help="Concurrent one-pair calls in the dynamic mode.")
    parser.add_argument("--window-ms", type=float, default=5.0, help="Server batch window in the dynamic mode.")
    parser.add_argument("--device", default="cpu", help="torch device of the reward model (cpu, cuda).")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default).")
    parser.add_argument("--rounds", type=int, default=3, help="Times each mode runs, in turn; its median counts.")
    args = parser.parse_args()

    items = workload(args.pairs)
    with tempfile.TemporaryDirectory(prefix="bench-reward-") as scratch:
        folder = model_folder(args.model, Path(scratch))
        registry = Registry(Path(scratch) / "registry")
        singles = [reward_pb2.ScoreRequest(items=[item]) for item in items]
        batches = [reward_pb2.ScoreRequest(items=items[i : i + args.batch]) for i in range(0, len(items), args.batch)]
        modes = {
            "one_at_a_time": (singles, 1, 0.0),
            "batched": (batches, 1, 0.0),
            "dynamic": (singles, args.concurrency, args.window_ms),
        }
        rounds: dict[str, list[float]] = {mode: [] for mode in modes}
        for _ in range(args.rounds):
            for mode, (requests, concurrency, window_ms) in modes.items():
                rounds[mode].append(run_mode(folder, registry, requests, concurrency, window_ms, args))
    seconds = {mode: statistics.median(times) for mode, times in rounds.items()}
    rates = {mode: args.pairs / s for mode, s in seconds.items()}
    for mode, rate in rates.items():
        spread = ", ".join(f"{args.pairs / s:.0f}" for s in rounds[mode])
        print(f"{mode:>14}: {rate:9.1f} pairs/s  (median of {spread}; {args.pairs} pairs a round)")
    batched_ratio = rates["batched"] / rates["one_at_a_time"]
    dynamic_ratio = rates["dynamic"] / rates["one_at_a_time"]
    print(f"batched / one at a time: {batched_ratio:.1f}x")
    print(f"dynamic / one at a time: {dynamic_ratio:.1f}x")
    print(
        json.dumps(
            {
                "bench": "reward",
                "model": args.model,
                "device": args.device,
                "pairs": args.pairs,
                "rounds": args.rounds,
                "pairs_per_s": rates,
                "pairs_per_s_rounds": {mode: [args.pairs / s for s in times] for mode, times in rounds.items()},
                "batched_ratio": batched_ratio,
                "dynamic_ratio": dynamic_ratio,
            }
        )
    )


if __name__ == "__main__":
    main()
