"""DPO on two CPU processes (torchrun, gloo) against one process with the same global batch
and seed: the same per-step losses, the same weights in every process, one writer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tuneloop.common.local_kafka import free_port
from tuneloop.common.tiny_models import make_tiny
from tuneloop.trainer.config import DPOStageConfig, load_config
from tuneloop.trainer.stages import run_dpo

TOPICS = ["cats", "rain", "tea", "maps", "trains", "books", "music", "bread"]
STEPS = 3
GLOBAL_BATCH = 4
# The runs differ only in the order of float additions (per-process means averaged by the
# all-reduce instead of one mean over the global batch): measured ~1e-7 on the losses and,
# after Adam has amplified those rounding differences for a few steps, ~1e-5 on the weights.
LOSS_TOLERANCE = 1e-5
WEIGHT_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dist")
    policy, _ = make_tiny(root / "models")
    prefs = root / "prefs.jsonl"
    prefs.write_text(
        "\n".join(
            json.dumps({"prompt": f"Tell me about {t}.", "chosen": f"Sure, {t}.", "rejected": "No."}) for t in TOPICS
        )
    )
    config = root / "dpo.yaml"
    config.write_text(
        f"model: {policy}\npreferences:\n  path: {prefs}\nmax_steps: {STEPS}\nsave_steps: {STEPS}\n"
        "logging_steps: 1\nlearning_rate: 0.01\nseed: 3\n"
    )
    return {"root": root, "config": config}


def losses(out: Path) -> list[float]:
    state = json.loads((out / "checkpoints" / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    return [row["loss"] for row in state["log_history"] if "loss" in row]


def run_two_processes(config: Path, out: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        "-m", "tuneloop.trainer.cli", "dpo", "--config", str(config),
        "--set", f"output_dir={out}", "--set", f"per_device_train_batch_size={GLOBAL_BATCH // 2}",
    ]  # fmt: skip
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def test_dpo_two_processes_match_one(setup: dict[str, Path]) -> None:
    one_out, two_out = setup["root"] / "one", setup["root"] / "two"
    one = run_dpo(
        load_config(
            DPOStageConfig, setup["config"], [f"output_dir={one_out}", f"per_device_train_batch_size={GLOBAL_BATCH}"]
        )
    )
    proc = run_two_processes(setup["config"], two_out)
    assert proc.returncode == 0, proc.stderr[-4000:]

    # One outcome line (the main process's), saying two processes trained.
    outcome = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(outcome) == 1 and outcome[0]["processes"] == 2 and one.processes == 1

    # Every process ended with the same weights (the stage also refuses to finish otherwise).
    digests = {}
    for line in proc.stderr.splitlines():
        if line.startswith("{") and '"trained weights"' in line:
            record = json.loads(line)
            digests[record["rank"]] = record["weights_sha256"]
    assert sorted(digests) == [0, 1] and len(set(digests.values())) == 1
    assert outcome[0]["weights_sha256"] == digests[0]

    # Per-step losses agree with the one-process run.
    single, double = losses(one_out), losses(two_out)
    assert len(single) == len(double) == STEPS
    assert max(abs(a - b) for a, b in zip(single, double, strict=True)) < LOSS_TOLERANCE, (single, double)

    # The saved models (written once, by the main process) agree too.
    a = AutoModelForCausalLM.from_pretrained(one_out / "model").state_dict()
    b = AutoModelForCausalLM.from_pretrained(two_out / "model").state_dict()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < WEIGHT_TOLERANCE
    start = AutoModelForCausalLM.from_pretrained(setup["root"] / "models" / "policy").state_dict()
    assert not all(torch.equal(a[k], start[k]) for k in a)  # the runs trained: the comparison means something
    assert len((two_out / "metrics.jsonl").read_text().splitlines()) == STEPS  # one writer


def test_weights_digest_names_the_weights() -> None:
    from tuneloop.trainer.distributed import check_ranks_agree, weights_digest

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    digest = weights_digest(model)
    assert digest == check_ranks_agree(model)  # one process: nothing to compare with
    with torch.no_grad():
        model.bias[0] += 1e-7
    assert weights_digest(model) != digest


def test_one_process_loops_refuse_a_launcher(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from tuneloop.trainer.config import ConfigError, PPOParams
    from tuneloop.trainer.ppo import PPOTrainer

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="one process"):
        PPOTrainer(PPOParams(), "unused", ["a prompt"], lambda p, c, **_: [0.0], tmp_path)
