"""PPO call sites on the tiny model: the scored distribution is the sampled one, the first
update pass sees ratio 1, and training moves the policy away from its reference."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tuneloop.common.tiny_models import make_tiny
from tuneloop.trainer import ppo_math as pm
from tuneloop.trainer.config import ConfigError, PPOParams, PPOStageConfig, load_config
from tuneloop.trainer.ppo import PPOTrainer

PROMPTS = [f"Tell me about {t}." for t in ("cats", "rain", "tea", "maps")]


def length_reward(prompts: list[str], completions: list[str], **_: object) -> list[float]:
    # Deliberately far from unit scale: normalisation has something to do.
    return [100.0 * len(c) for c in completions]


@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny policy shipped the way real checkpoints are: sampling defaults and attention dropout."""
    path, _ = make_tiny(tmp_path_factory.mktemp("tiny"))
    config = json.loads((path / "config.json").read_text())
    config["attention_dropout"] = 0.5
    (path / "config.json").write_text(json.dumps(config))
    gen = json.loads((path / "generation_config.json").read_text())
    gen.update(do_sample=True, temperature=0.3, top_k=3, top_p=0.5, min_p=0.2, repetition_penalty=1.8)
    (path / "generation_config.json").write_text(json.dumps(gen))
    return path


def trainer(policy: Path, out: Path, *extra: str) -> PPOTrainer:
    params = load_config(
        PPOParams,
        None,
        ["max_new_tokens=6", "rollout_batch_size=4", "per_device_train_batch_size=2", "ppo_epochs=2",
         "temperature=0.7", "learning_rate=1e-2", *extra],
    )
    return PPOTrainer(params, str(policy), PROMPTS, length_reward, out)


def test_rollout_logprobs_are_the_sampling_distribution(policy: Path, tmp_path: Path) -> None:
    t = trainer(policy, tmp_path)
    batch = t.rollout(PROMPTS, keep_sample_logprobs=True)
    assert batch.sample_logprobs is not None and batch.mask.sum() > 0
    # generate's scores are the logits it sampled from; the model's top-k/top-p/repetition
    # penalty would put -inf or shifted values there, and the scored softmax would differ.
    torch.testing.assert_close(batch.logprobs, batch.sample_logprobs, atol=1e-4, rtol=0)
    assert torch.isfinite(batch.sample_logprobs).all()
    # The model's own generation config is kept for serving.
    assert t.policy.generation_config.repetition_penalty == 1.8


def test_a_rows_sample_depends_on_its_seed_not_on_its_batch(policy: Path, tmp_path: Path) -> None:
    t = trainer(policy, tmp_path)
    whole = t.rollout(PROMPTS, range(4))
    halves = [t.rollout(PROMPTS[:2], range(2)), t.rollout(PROMPTS[2:], range(2, 4))]
    tokens = [r[: int(m.sum())].tolist() for b in halves for r, m in zip(b.input_ids[:, b.prompt_len :], b.mask, strict=True)]
    assert tokens == [r[: int(m.sum())].tolist() for r, m in zip(whole.input_ids[:, whole.prompt_len :], whole.mask, strict=True)]
    torch.testing.assert_close(torch.cat([h.logprobs for h in halves]), whole.logprobs, atol=1e-5, rtol=0)
    # Another step draws other tokens for the same rows.
    t.step += 1
    assert not torch.equal(t.rollout(PROMPTS, range(4)).input_ids, whole.input_ids)


@pytest.mark.parametrize("lora", [False, True], ids=["copy", "lora"])
def test_first_minibatch_sees_ratio_one(policy: Path, tmp_path: Path, lora: bool) -> None:
    extra = ["lora.enabled=true", "lora.r=4", "lora.dropout=0.5"] if lora else []
    t = trainer(policy, tmp_path, *extra)
    batch = t.rollout(PROMPTS)
    kl, advantages, returns = t.advantages(batch, t.shaped_scores(batch))
    assert kl.abs().max() < 1e-5  # the policy is its reference
    t.policy.train()  # the mode the update runs in: no dropout may be left to change the ratio
    _, pg, vf = t.micro_loss(batch, torch.arange(2), advantages, returns)
    assert pg.clip_fraction.item() == 0.0
    assert pg.approx_kl.item() < 1e-10
    assert vf.clip_fraction.item() == 0.0
    attention = [m for m in t.policy.modules() if hasattr(m, "attention_dropout")]
    assert attention and all(m.attention_dropout == 0.0 for m in attention)


@pytest.mark.parametrize("lora", [False, True], ids=["copy", "lora"])
def test_kl_is_positive_after_training(policy: Path, tmp_path: Path, lora: bool) -> None:
    extra = ["lora.enabled=true", "lora.r=4"] if lora else []
    t = trainer(policy, tmp_path, *extra)
    for _ in range(2):
        t.train_step()
    batch = t.rollout(PROMPTS)
    # k3 is >= 0 per token and 0 only where policy and reference agree on the token.
    k3 = pm.kl_penalty(batch.logprobs, batch.ref_logprobs, "k3") * batch.mask
    assert k3.sum().item() > 1e-4
    assert t.score_moments.count == 2 * len(PROMPTS)  # the two training rollouts (a bare rollout is not normalised)
    assert t.score_moments.std > 1.0  # raw scores of 100 per character: far from unit scale


def test_retired_sampling_and_whitening_fields(tmp_path: Path) -> None:
    base = ["model=m", f"output_dir={tmp_path}", "prompts=p.jsonl", "reward.model=r"]
    # A config saved by an earlier run, at the old defaults, still loads.
    load_config(PPOStageConfig, None, [*base, "top_k=0", "top_p=1.0", "whiten_rewards=false"])
    for field in ("top_k=5", "top_p=0.9", "whiten_rewards=true"):
        with pytest.raises(ConfigError, match=field.split("=")[0]):
            load_config(PPOStageConfig, None, [*base, field])
