"""RLOO and GRPO sampling through vLLM in the training process: the trained weights pushed into
the engine in place before each step, and checked there by log-probabilities; a push that does
not land stops the run."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from tuneloop.common.tiny_models import make_tiny
from tuneloop.trainer import vllm_rollouts
from tuneloop.trainer.config import ConfigError, OnlineRLStageConfig, load_config
from tuneloop.trainer.stages import run_online_rl

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")

TOPICS = ["cats", "rain", "tea", "maps", "trains", "books", "music", "bread"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vllm-rollouts")
    policy, reward = make_tiny(root / "models")
    prompts = root / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": f"Tell me about {t}."}) for t in TOPICS))
    return {"policy": policy, "reward": reward, "prompts": prompts}


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
        run_online_rl("rloo", config(tiny, tmp_path / "stale", "learning_rate=0.1"))


def test_a_model_vllm_cannot_serve_is_refused_by_name(tmp_path: Path) -> None:
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(ConfigError, match="rollout_engine: vllm cannot sample from this model: .* not a full model folder"):
        vllm_rollouts.trl_rollout_args(adapter, 16, 8)
