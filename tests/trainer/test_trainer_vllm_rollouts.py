"""Online RL sampling through vLLM in the training process (RLOO and GRPO through TRL's
colocate mode, PPO through its own engine): the trained weights pushed into the engine in
place before each step and checked there by log-probabilities; a push that does not land
stops the run; PPO's rows sampled from their own seeds, so two processes sample what one does."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM
from tuneloop.common.local_kafka import free_port
from tuneloop.common.tiny_models import make_tiny
from tuneloop.trainer import vllm_rollouts
from tuneloop.trainer.config import (
    ConfigError,
    OnlineRLStageConfig,
    PPOStageConfig,
    load_config,
)
from tuneloop.trainer.ppo import run_ppo
from tuneloop.trainer.stages import run_online_rl

from tests.support.policies import stopping_policy

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")

TOPICS = ["cats", "rain", "tea", "maps", "trains", "books", "music", "bread"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vllm-rollouts")
    policy, reward = make_tiny(root / "models")
    prompts = root / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": f"Tell me about {t}."}) for t in TOPICS))
    stopping = stopping_policy(policy, root / "models" / "stopping")
    return {"policy": policy, "stopping": stopping, "reward": reward, "prompts": prompts, "root": root}


def config(tiny: dict[str, Path], out: Path, *extra: str) -> OnlineRLStageConfig:
    return load_config(
        OnlineRLStageConfig,
        None,
        [
            f"model={tiny['policy']}", f"output_dir={out}", f"prompts={tiny['prompts']}", f"reward.model={tiny['reward']}",
            "max_steps=3", "num_generations=2", "per_device_train_batch_size=4", "max_completion_length=8",
            "learning_rate=1e-2", "logging_steps=1", "rollout_engine=vllm", *extra,
        ],
    )  # fmt: skip


@pytest.mark.parametrize("algorithm", ["rloo", pytest.param("grpo", marks=pytest.mark.heavy)])
def test_rollouts_come_from_vllm_holding_the_trained_weights(algorithm: str, tiny: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / algorithm
    result = run_online_rl(algorithm, config(tiny, out))  # type: ignore[arg-type]
    assert result.steps == 3
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    gaps = [r["rollout_logprob_gap"] for r in rows if "rollout_logprob_gap" in r]
    # One push per step, each checked: vLLM scores its own samples as the trained model does
    # (both fp32: vLLM alone would have run this fp32 model in bf16).
    assert len(gaps) == 3 and max(gaps) < 1e-4, gaps
    start = AutoModelForCausalLM.from_pretrained(tiny["policy"]).state_dict()
    trained = AutoModelForCausalLM.from_pretrained(out / "model").state_dict()
    # The weights moved well past the gap tolerance: a stale engine would have been caught.
    assert max((start[k] - trained[k]).abs().max().item() for k in start) > 1e-3


def test_a_push_that_does_not_land_stops_the_run(tiny: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vllm_rollouts, "swap_weights", lambda worker, **_: None)
    with pytest.raises(RuntimeError, match="differ from the trained model's by .* after a weight push"):
        run_online_rl("rloo", config(tiny, tmp_path / "stale", "learning_rate=0.1"))  # type: ignore[arg-type]


def test_a_model_vllm_cannot_serve_is_refused_by_name(tmp_path: Path) -> None:
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(ConfigError, match="rollout_engine: vllm cannot sample from this model: .* not a full model folder"):
        vllm_rollouts.trl_rollout_args(adapter, 16, 8)


def ppo_sets(tiny: dict[str, Path], out: Path, batch: int) -> list[str]:
    return [
        f"model={tiny['stopping']}", f"output_dir={out}", f"prompts={tiny['prompts']}", f"reward.model={tiny['reward']}",
        "max_steps=3", "rollout_batch_size=4", f"per_device_train_batch_size={batch}", "ppo_epochs=2",
        "max_new_tokens=8", "temperature=0.8", "learning_rate=1e-2", "lr_scheduler_type=constant", "logging_steps=1",
        "save_steps=100", "seed=5", "rollout_engine=vllm",
    ]  # fmt: skip


def ppo_rows(out: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


def test_ppo_samples_from_vllm_by_row_seed_on_one_process_and_two(tiny: dict[str, Path]) -> None:
    one_out, two_out = tiny["root"] / "ppo-one", tiny["root"] / "ppo-two"
    run_ppo(load_config(PPOStageConfig, None, ppo_sets(tiny, one_out, 4)))
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(free_port()), "-m", "tuneloop.trainer.cli", "ppo",
        *[arg for s in ppo_sets(tiny, two_out, 2) for arg in ("--set", s)],
    ]  # fmt: skip
    proc = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]

    one, two = ppo_rows(one_out), ppo_rows(two_out)
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3]
    # Every step's weights were pushed before sampling: vLLM scores its samples as the trained model does.
    assert max(r["rollout_logprob_gap"] for r in one + two) < 1e-4
    assert len({r["response_length"] for r in one}) > 1  # ended at an eos and cut: both handled
    assert max(r["kl"] for r in one) > 1e-3  # the policy moved: a stale engine would show in the gap
    # Each process sampled its rows with the rows' seeds: the same responses, so the same run.
    for key in ("reward", "kl", "response_length", "policy_loss", "value_loss"):
        for a, b in zip(one, two, strict=True):
            assert abs(a[key] - b[key]) < 1e-4 * max(1.0, abs(a[key])), (key, a[key], b[key])


def test_ppo_stops_when_a_push_does_not_land(tiny: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vllm_rollouts, "swap_weights", lambda worker, **_: None)
    sets = [*ppo_sets(tiny, tmp_path / "stale", 4), "learning_rate=0.1"]
    with pytest.raises(RuntimeError, match="differ from the trained model's by .* after a weight push"):
        run_ppo(load_config(PPOStageConfig, None, sets))


def test_ppo_with_lora_pushes_the_merged_weights(tiny: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "lora"
    sets = [*ppo_sets(tiny, out, 4), "lora.enabled=true", "lora.r=4", "learning_rate=5e-2"]
    run_ppo(load_config(PPOStageConfig, None, sets))
    rows = ppo_rows(out)
    # The adapters moved the policy (KL to the base > 0) and vLLM sampled from base + adapters.
    assert rows[-1]["kl"] > 1e-3
    assert max(r["rollout_logprob_gap"] for r in rows) < 1e-4
