"""Each stage trains a few steps of the tiny model on CPU and leaves a loadable model,
per-step metrics and gauges; PPO resumes from its checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tuneloop.common.tiny_models import make_tiny
from tuneloop.trainer.config import (
    ConfigError,
    DPOStageConfig,
    OnlineRLStageConfig,
    PPOStageConfig,
    SFTStageConfig,
    load_config,
)
from tuneloop.trainer.metrics import read_metrics
from tuneloop.trainer.ppo import run_ppo
from tuneloop.trainer.stages import run_dpo, run_online_rl, run_sft

TOPICS = ["cats", "rain", "tea", "maps", "trains", "books", "music", "bread"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    policy, reward = make_tiny(root / "models")
    data = root / "data"
    data.mkdir()
    (data / "sft.jsonl").write_text(
        "\n".join(
            json.dumps({"messages": [{"role": "user", "content": f"Tell me about {t}."}, {"role": "assistant", "content": "Sure."}]})
            for t in TOPICS
        )
    )
    (data / "prefs.jsonl").write_text(
        "\n".join(json.dumps({"prompt": f"Tell me about {t}.", "chosen": "Sure.", "rejected": "No."}) for t in TOPICS)
    )
    (data / "prompts.jsonl").write_text("\n".join(json.dumps({"prompt": f"Tell me about {t}."}) for t in TOPICS))
    return {"policy": policy, "reward": reward, "data": data}


def assert_loadable(model_dir: Path, original: Path) -> None:
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    before = AutoModelForCausalLM.from_pretrained(original)
    ids = tok("Tell me about cats.", return_tensors="pt")
    with torch.no_grad():
        assert not torch.allclose(model(**ids).logits, before(**ids).logits), "training changed nothing"
    out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]


def test_sft(tiny: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "sft"
    config = load_config(
        SFTStageConfig,
        None,
        [f"model={tiny['policy']}", f"output_dir={out}", f"data={tiny['data'] / 'sft.jsonl'}", "max_steps=3", "learning_rate=1e-3"],
    )
    result = run_sft(config)
    assert result.steps == 3
    assert_loadable(Path(result.model_dir), tiny["policy"])
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all("loss" in r and r["stage"] == "sft" for r in rows)


def test_dpo_with_lora_merges_into_a_plain_model(tiny: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "dpo"
    config = load_config(
        DPOStageConfig,
        None,
        [
            f"model={tiny['policy']}",
            f"output_dir={out}",
            f"preferences.path={tiny['data'] / 'prefs.jsonl'}",
            "max_steps=3",
            "learning_rate=1e-2",
            "lora.enabled=true",
            "lora.r=4",
        ],
    )
    result = run_dpo(config)
    model_dir = Path(result.model_dir)
    assert not (model_dir / "adapter_config.json").exists()  # merged, not an adapter
    assert_loadable(model_dir, tiny["policy"])
    rows = read_metrics(out)
    assert len(rows) == 3 and all("reward" in r for r in rows)  # DPO's implicit reward margin
    prom = (out / "metrics.prom").read_text()
    assert 'tuneloop_trainer_reward{run="dpo",stage="dpo"}' in prom
    # A second run into the same folder must not silently train over the first one's checkpoints.
    if (out / "checkpoints").exists() and any((out / "checkpoints").iterdir()):
        with pytest.raises(ConfigError, match="already holds checkpoints"):
            run_dpo(config)


def ppo_config(tiny: dict[str, Path], out: Path, *extra: str) -> PPOStageConfig:
    return load_config(
        PPOStageConfig,
        None,
        [
            f"model={tiny['policy']}",
            f"output_dir={out}",
            f"prompts={tiny['data'] / 'prompts.jsonl'}",
            f"reward.model={tiny['reward']}",
            "max_new_tokens=6",
            "rollout_batch_size=4",
            "per_device_train_batch_size=2",
            "ppo_epochs=2",
            "learning_rate=1e-3",
            "kl.adaptive=true",
            "kl.target=0.5",
            "kl.horizon=100",
            *extra,
        ],
    )


def test_ppo_logs_every_step_and_resumes(tiny: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "ppo"
    first = run_ppo(ppo_config(tiny, out, "max_steps=2", "save_steps=1"))
    assert first.steps == 2
    assert_loadable(Path(first.model_dir), tiny["policy"])
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("reward", "kl", "kl_coef", "response_length", "response_length_ratio", "entropy", "clip_fraction", "value_loss", "policy_loss"):
        assert all(key in r for r in rows), key
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-4)  # first rollout: the policy is the reference
    assert rows[1]["kl_coef"] != rows[0]["kl_coef"]  # the adaptive controller moved
    prom = (out / "metrics.prom").read_text()
    for gauge in ("tuneloop_trainer_kl", "tuneloop_trainer_reward", "tuneloop_trainer_response_length_ratio"):
        assert gauge + "{" in prom

    # Resume: same folder, more steps; continues at step 2 with the saved KL coefficient.
    resumed = run_ppo(ppo_config(tiny, out, "max_steps=3", "save_steps=1"), resume=True)
    assert resumed.resumed_from and resumed.resumed_from.endswith("checkpoint-1")
    assert resumed.steps == 3
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 2, 3]


@pytest.mark.parametrize("algorithm", ["rloo", pytest.param("grpo", marks=pytest.mark.heavy)])
def test_online_rl(algorithm: str, tiny: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / algorithm
    config = load_config(
        OnlineRLStageConfig,
        None,
        [
            f"model={tiny['policy']}",
            f"output_dir={out}",
            f"prompts={tiny['data'] / 'prompts.jsonl'}",
            f"reward.model={tiny['reward']}",
            "max_steps=2",
            "num_generations=2",
            "per_device_train_batch_size=2",
            "max_completion_length=6",
            "learning_rate=1e-2",
        ],
    )
    result = run_online_rl(algorithm, config)  # type: ignore[arg-type]
    assert result.steps == 2
    assert_loadable(Path(result.model_dir), tiny["policy"])
    rows = read_metrics(out)
    assert len(rows) == 2 and all({"reward", "kl", "response_length"} <= set(r) for r in rows)


def test_ppo_with_lora_uses_the_base_as_reference_and_resumes(tiny: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "ppo-lora"
    extra = ["save_steps=1", "lora.enabled=true", "lora.r=4", "kl.adaptive=false", "kl.init_coef=0.1"]
    run_ppo(ppo_config(tiny, out, "max_steps=2", *extra))
    checkpoint = out / "checkpoints" / "checkpoint-1" / "policy"
    assert (checkpoint / "adapter_config.json").is_file()  # the adapter, not a whole model
    resumed = run_ppo(ppo_config(tiny, out, "max_steps=3", *extra), resume=True)
    assert resumed.steps == 3
    rows = read_metrics(out)
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-4)  # adapters start at zero: policy == base
    assert all(r["kl_coef"] == 0.1 for r in rows)  # fixed coefficient
    model_dir = Path(resumed.model_dir)
    assert not (model_dir / "adapter_config.json").exists()
    assert_loadable(model_dir, tiny["policy"])
