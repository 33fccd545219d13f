"""Choosing which checkpoint of a run becomes the candidate.

The last step is not always the best one: a preference loss keeps pushing after the behaviour
has moved, and general answers drift further with every step (a probe the parent got right
comes back wrong). A retrain that keeps checkpoints evaluates each of them, and the final
model, on the run's criteria; the one that passes every criterion with the most progress on
the behaviour is registered, and the earliest of equals (closest to the parent). When none
passes, the run is refused with each checkpoint's failures.
"""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneloop.trainer import criteria as cr
from tuneloop.trainer.modeling import CHECKPOINTS_DIR, FINAL_DIR

FINAL = "final"


@dataclass(frozen=True)
class Candidate:
    name: str  # `checkpoint-<step>` or `final`
    step: int
    path: Path  # a folder transformers loads as is (a LoRA checkpoint is merged first: `materialise`)


def _step(checkpoint: Path) -> int:
    return int(checkpoint.name.removeprefix("checkpoint-"))


def candidates(train_dir: Path, final_step: int, count: int) -> list[Candidate]:
    """The final model and the newest `count - 1` complete checkpoints before it, by step.

    A checkpoint at the final step is the final model again and is left out.
    """
    folder = train_dir / CHECKPOINTS_DIR
    kept = sorted(
        (p for p in folder.glob("checkpoint-*") if p.name[11:].isdigit() and (p / "trainer_state.json").is_file()),
        key=_step,
    ) if folder.is_dir() else []
    earlier = [Candidate(p.name, _step(p), p) for p in kept if _step(p) < final_step]
    chosen = earlier[-(count - 1):] if count > 1 else []
    return [*chosen, Candidate(FINAL, final_step, train_dir / FINAL_DIR)]


# What a Trainer checkpoint holds beside the model: needed to resume, never to serve.
TRAINER_STATE = ("optimizer.*", "scheduler.*", "scaler.*", "rng_state*", "trainer_state.json", "training_args.bin")


def materialise(candidate: Candidate, parent_dir: Path, out_dir: Path) -> Path:
    """A plain model folder for `candidate`, as the registry should hold it: the final model as
    is; a checkpoint without its optimizer and trainer state; a LoRA checkpoint (adapter files
    only) merged onto the parent. Written under `out_dir` once, appearing all at once."""
    if candidate.name == FINAL:
        return candidate.path
    target = out_dir / candidate.name
    if (target / "config.json").is_file():
        return target
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    from transformers import AutoTokenizer

    if not (candidate.path / "adapter_config.json").is_file():
        shutil.copytree(candidate.path, tmp, ignore=shutil.ignore_patterns(*TRAINER_STATE))
    else:
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(parent_dir, dtype=torch.float32)
        PeftModel.from_pretrained(base, candidate.path).merge_and_unload().save_pretrained(tmp)
    if not (candidate.path / "tokenizer_config.json").is_file():
        AutoTokenizer.from_pretrained(parent_dir).save_pretrained(tmp)  # training does not change it
    elif not (tmp / "tokenizer_config.json").is_file():
        AutoTokenizer.from_pretrained(candidate.path).save_pretrained(tmp)
    if target.exists():
        shutil.rmtree(target)
    os.rename(tmp, target)
    return target


def progress(before: dict[str, Any], after: dict[str, Any], criteria: cr.Criteria) -> float:
    """How far the behaviour moved: the mean gain in pass rate over the behaviour checks; with
    none declared, the gain in mean reward (0 when neither is measured)."""
    if criteria.behaviour:
        gains = [after["behaviour"][c.name] - (before["behaviour"].get(c.name) or 0.0) for c in criteria.behaviour]
        return sum(gains) / len(gains)
    if after.get("reward_mean") is not None and before.get("reward_mean") is not None:
        return float(after["reward_mean"]) - float(before["reward_mean"])
    return 0.0


def choose(
    before: dict[str, Any], evaluated: list[tuple[Candidate, dict[str, Any]]], criteria: cr.Criteria
) -> tuple[Candidate | None, list[dict[str, Any]]]:
    """The candidate to register (None: none passes) and one row per candidate for the report,
    in step order: its verdict, progress and failures."""
    rows: list[dict[str, Any]] = []
    best: tuple[float, int, Candidate] | None = None
    for candidate, after in sorted(evaluated, key=lambda e: e[0].step):
        verdict = cr.compare(before, after, criteria)
        gain = progress(before, after, criteria)
        rows.append({
            "name": candidate.name,
            "step": candidate.step,
            "passed": verdict.passed,
            "progress": round(gain, 4),
            "behaviour": after["behaviour"],
            "probe_pass_rate": after.get("probe_pass_rate"),
            "kl_to_reference": after.get("kl_to_reference"),
            "failures": [f"{c.name}: {c.reason}" for c in verdict.failures],
            "verdict": verdict.model_dump(),
        })
        # Strictly more progress wins, so among equals the earliest step (least drift) stays.
        if verdict.passed and (best is None or gain > best[0]):
            best = (gain, candidate.step, candidate)
    for row in rows:
        row["chosen"] = best is not None and row["name"] == best[2].name
    return (best[2] if best else None), rows


def refusal(rows: list[dict[str, Any]]) -> str:
    """The reason of a run none of whose checkpoints passed: each one's failures."""
    return "no checkpoint passes the criteria: " + "; ".join(
        f"{r['name']} (step {r['step']}): {', '.join(r['failures'])}" for r in rows
    )
