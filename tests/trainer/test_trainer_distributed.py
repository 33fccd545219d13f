"""DPO and PPO on two CPU processes (torchrun, gloo) against one process with the same global
batch and seed: the same per-step losses, the same weights in every process, one writer; and
checkpoints written by two processes resumed by one."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM
from tuneloop.common.local_kafka import free_port
from tuneloop.common.tiny_models import make_tiny
from tuneloop.trainer.config import DPOStageConfig, PPOStageConfig, load_config
from tuneloop.trainer.ppo import run_ppo
from tuneloop.trainer.stages import run_dpo

from tests.support.policies import stopping_policy

TOPICS = ["cats", "rain", "tea", "maps", "trains", "books", "music", "bread"]
STEPS = 3
GLOBAL_BATCH = 4
# The runs differ only in the order of float additions (per-process means averaged by the
# all-reduce instead of one mean over the global batch): measured ~1e-7 on the losses and,
# after Adam has amplified those rounding differences for a few steps, ~1e-5 on the weights.
LOSS_TOLERANCE = 1e-5
WEIGHT_TOLERANCE = 1e-4
# PPO's figures, relative to the figure (or absolute below 1): the same float-order differences,
# carried through sampling (a token flips only if a Gumbel draw sits within ~1e-6 of a tie),
# whitening and two epochs of updates.
PPO_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dist")
    policy, reward = make_tiny(root / "models")
    prefs = root / "prefs.jsonl"
    prefs.write_text(
        "\n".join(
            json.dumps({"prompt": f"Tell me about {t}.", "chosen": f"Sure, {t}.", "rejected": "No."}) for t in TOPICS
        )
    )
    config = root / "dpo.yaml"
    config.write_text(
        f"model: {policy}\npreferences:\n  path: {prefs}\nmax_steps: {STEPS}\nsave_steps: 1\nsave_total_limit: {STEPS}\n"
        "logging_steps: 1\nlearning_rate: 0.01\nseed: 3\n"
    )
    prompts = root / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": f"Tell me about {t}."}) for t in TOPICS))
    # Responses of varied length: the processes' shares hold different numbers of tokens, so
    # token means must be global ones.
    stopping = stopping_policy(policy, root / "models" / "stopping")
    ppo = root / "ppo.yaml"
    # Two PPO epochs of one update each: the update is the whole global batch however it is split.
    ppo.write_text(
        f"model: {stopping}\nprompts: {prompts}\nreward:\n  model: {reward}\nmax_steps: {STEPS}\nsave_steps: 1\n"
        "save_total_limit: 3\nlogging_steps: 1\nlearning_rate: 0.01\nlr_scheduler_type: constant\nseed: 3\n"
        f"rollout_batch_size: {GLOBAL_BATCH}\nppo_epochs: 2\nmax_new_tokens: 6\ntemperature: 0.8\n"
    )
    return {"root": root, "config": config, "ppo": ppo}


def losses(out: Path) -> list[float]:
    state = json.loads((out / "checkpoints" / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    return [row["loss"] for row in state["log_history"] if "loss" in row]


def run_two_processes(stage: str, config: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        "-m", "tuneloop.trainer.cli", stage, "--config", str(config),
        "--set", f"output_dir={out}", "--set", f"per_device_train_batch_size={GLOBAL_BATCH // 2}", *extra,
    ]  # fmt: skip
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def rank_digests(stderr: str) -> dict[int, str]:
    digests = {}
    for line in stderr.splitlines():
        if line.startswith("{") and '"trained weights"' in line:
            record = json.loads(line)
            digests[record["rank"]] = record["weights_sha256"]
    return digests


def max_weight_difference(a_dir: Path, b_dir: Path) -> float:
    a = AutoModelForCausalLM.from_pretrained(a_dir).state_dict()
    b = AutoModelForCausalLM.from_pretrained(b_dir).state_dict()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_dpo_two_processes_match_one_and_resume_in_one(setup: dict[str, Path]) -> None:
    one_out, two_out = setup["root"] / "one", setup["root"] / "two"
    one = run_dpo(
        load_config(
            DPOStageConfig, setup["config"], [f"output_dir={one_out}", f"per_device_train_batch_size={GLOBAL_BATCH}"]
        )
    )
    proc = run_two_processes("dpo", setup["config"], two_out)
    assert proc.returncode == 0, proc.stderr[-4000:]

    # One outcome line (the main process's), saying two processes trained.
    outcome = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(outcome) == 1 and outcome[0]["processes"] == 2 and one.processes == 1

    # Every process ended with the same weights (the stage also refuses to finish otherwise).
    digests = rank_digests(proc.stderr)
    assert sorted(digests) == [0, 1] and len(set(digests.values())) == 1
    assert outcome[0]["weights_sha256"] == digests[0]

    # Per-step losses agree with the one-process run.
    single, double = losses(one_out), losses(two_out)
    assert len(single) == len(double) == STEPS
    assert max(abs(a - b) for a, b in zip(single, double, strict=True)) < LOSS_TOLERANCE, (single, double)

    # The saved models (written once, by the main process) agree too.
    assert max_weight_difference(one_out / "model", two_out / "model") < WEIGHT_TOLERANCE
    # The runs trained: the comparison means something.
    assert max_weight_difference(one_out / "model", setup["root"] / "models" / "policy") > 100 * WEIGHT_TOLERANCE
    assert len((two_out / "metrics.jsonl").read_text().splitlines()) == STEPS  # one writer

    # The two-process run as a kill after its second checkpoint leaves it, resumed by one
    # process (TRL's trainer, resuming on another process count): the same last step.
    resumed_out = setup["root"] / "resumed"
    shutil.copytree(two_out / "checkpoints" / "checkpoint-2", resumed_out / "checkpoints" / "checkpoint-2")
    resumed = run_dpo(
        load_config(DPOStageConfig, setup["config"], [f"output_dir={resumed_out}", f"per_device_train_batch_size={GLOBAL_BATCH}"]),
        resume=True,
    )
    assert resumed.resumed_from and resumed.resumed_from.endswith("checkpoint-2") and resumed.steps == STEPS
    assert abs(losses(resumed_out)[-1] - single[-1]) < LOSS_TOLERANCE
    assert max_weight_difference(one_out / "model", resumed_out / "model") < WEIGHT_TOLERANCE


def ppo_rows(out: Path) -> list[dict[str, float]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("stage") == "ppo" and "loss" in r]


PPO_COMPARED = ("reward", "kl", "policy_loss", "value_loss", "approx_kl", "response_length", "reward_running_mean")


def assert_ppo_steps_agree(a: list[dict[str, float]], b: list[dict[str, float]]) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for key in PPO_COMPARED:
        worst = max(abs(x[key] - y[key]) / max(1.0, abs(x[key])) for x, y in zip(a, b, strict=True))
        assert worst < PPO_TOLERANCE, (key, [x[key] for x in a], [y[key] for y in b])


def test_ppo_two_processes_match_one_and_resume_in_one(setup: dict[str, Path]) -> None:
    one_out, two_out, resumed_out = (setup["root"] / name for name in ("ppo-one", "ppo-two", "ppo-resumed"))
    one = run_ppo(load_config(PPOStageConfig, setup["ppo"], [f"output_dir={one_out}", f"per_device_train_batch_size={GLOBAL_BATCH}"]))
    proc = run_two_processes("ppo", setup["ppo"], two_out)
    assert proc.returncode == 0, proc.stderr[-4000:]
    outcome = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(outcome) == 1 and outcome[0]["processes"] == 2 and one.processes == 1
    digests = rank_digests(proc.stderr)
    assert sorted(digests) == [0, 1] and len(set(digests.values())) == 1

    # Each process sampled its half of the rows with the rows' own seeds: the same responses,
    # rewards, losses and KL as one process over the whole batch, step by step.
    single, double = ppo_rows(one_out), ppo_rows(two_out)
    assert len(single) == STEPS and len({r["response_length"] for r in single}) > 1
    assert_ppo_steps_agree(single, double)
    assert max(r["kl"] for r in single) > 1e-4  # the policy moved off its reference
    assert max_weight_difference(one_out / "model", two_out / "model") < WEIGHT_TOLERANCE
    assert max_weight_difference(one_out / "model", setup["root"] / "models" / "policy") > 100 * WEIGHT_TOLERANCE
    assert (two_out / "value_head.pt").is_file()

    # The two-process run as a kill after its first checkpoint leaves it, resumed by one process:
    # steps 2 and 3 are those of the uninterrupted runs.
    resumed_out.mkdir()
    shutil.copytree(two_out / "checkpoints" / "checkpoint-1", resumed_out / "checkpoints" / "checkpoint-1")
    resumed = run_ppo(
        load_config(PPOStageConfig, setup["ppo"], [f"output_dir={resumed_out}", f"per_device_train_batch_size={GLOBAL_BATCH}"]),
        resume=True,
    )
    assert resumed.resumed_from and resumed.resumed_from.endswith("checkpoint-1") and resumed.steps == STEPS
    assert_ppo_steps_agree(single[1:], ppo_rows(resumed_out))
    assert max_weight_difference(one_out / "model", resumed_out / "model") < WEIGHT_TOLERANCE


def test_weights_digest_names_the_weights() -> None:
    from tuneloop.trainer.distributed import check_ranks_agree, weights_digest

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    digest = weights_digest(model)
    assert digest == check_ranks_agree(model)  # one process: nothing to compare with
    with torch.no_grad():
        model.bias[0] += 1e-7
    assert weights_digest(model) != digest


def test_ppo_refuses_a_rollout_batch_that_does_not_split(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from tuneloop.trainer.config import ConfigError, PPOParams
    from tuneloop.trainer.ppo import PPOTrainer

    monkeypatch.setenv("WORLD_SIZE", "3")
    params = PPOParams(rollout_batch_size=4, per_device_train_batch_size=1)
    with pytest.raises(ConfigError, match="rollout_batch_size .4. must split into 3 equal shares"):
        PPOTrainer(params, "unused", ["a prompt"], lambda p, c, **_: [0.0], tmp_path)
