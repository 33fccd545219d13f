"""PPO arithmetic against numbers worked out by hand (the working is in each comment)."""

from __future__ import annotations

import math

import pytest
import torch

from tuneloop.trainer import ppo_math as pm


def t(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def test_gae_single_episode() -> None:
    # gamma=1, lam=0.5; deltas: t2 = 1 - 0.7 = 0.3, t1 = 0.7 - 0.6 = 0.1, t0 = 0.6 - 0.5 = 0.1
    # A2 = 0.3, A1 = 0.1 + 0.5 * 0.3 = 0.25, A0 = 0.1 + 0.5 * 0.25 = 0.225
    adv, ret = pm.gae(t([0, 0, 1]), t([0.5, 0.6, 0.7]), t([1, 1, 1]), gamma=1.0, lam=0.5)
    assert adv[0].tolist() == pytest.approx([0.225, 0.25, 0.3])
    assert ret[0].tolist() == pytest.approx([0.725, 0.85, 1.0])


def test_gae_stops_at_padding() -> None:
    # gamma=0.9, lam=1; the third token is padding, so the episode ends after t1:
    # A1 = 2 - 1 = 1, A0 = (0 + 0.9 * 1 - 1) + 0.9 * 1 = 0.8; padding values must not leak in.
    adv, ret = pm.gae(t([0, 2, 99]), t([1, 1, 99]), t([1, 1, 0]), gamma=0.9, lam=1.0)
    assert adv[0].tolist() == pytest.approx([0.8, 1.0, 0.0])
    assert ret[0].tolist() == pytest.approx([1.8, 2.0, 0.0])


def test_whiten_masked() -> None:
    # mean of (1, 2, 3) is 2, population variance 2/3, so (x - 2) / sqrt(2/3)
    s = 1 / math.sqrt(2 / 3)
    out = pm.whiten(t([1, 2, 3, 40]), t([1, 1, 1, 0]))
    assert out[0].tolist() == pytest.approx([-s, 0.0, s, 0.0], abs=1e-6)
    kept = pm.whiten(t([1, 2, 3, 40]), t([1, 1, 1, 0]), shift_mean=False)
    assert kept[0].tolist() == pytest.approx([2 - s, 2.0, 2 + s, 0.0], abs=1e-6)


def test_kl_estimators() -> None:
    lp, ref = t([math.log(0.5)]), t([math.log(0.25)])
    # k1 = log(0.5 / 0.25) = log 2
    assert pm.kl_penalty(lp, ref, "k1").item() == pytest.approx(math.log(2))
    # k3 with q/p = 0.5: (0.5 - 1) - log 0.5 = 0.19315
    assert pm.kl_penalty(lp, ref, "k3").item() == pytest.approx(-0.5 + math.log(2))
    # k3 is never negative, even where k1 is
    assert pm.kl_penalty(ref, lp, "k1").item() < 0 < pm.kl_penalty(ref, lp, "k3").item()
    with pytest.raises(ValueError, match="k2"):
        pm.kl_penalty(lp, ref, "k2")  # type: ignore[arg-type]


def test_token_rewards_put_score_on_last_real_token() -> None:
    kl = t([0.1, 0.2, 0.3], [0.5, 0.5, 0.0])
    rewards = pm.token_rewards(t([1.0, 2.0])[0], kl, t([1, 1, 1], [1, 1, 0]), kl_coef=0.1)
    assert rewards.tolist()[0] == pytest.approx([-0.01, -0.02, 0.97])
    assert rewards.tolist()[1] == pytest.approx([-0.05, 1.95, 0.0])


def test_clipped_policy_loss() -> None:
    # r = 1.5, A = 1: max(-1.5, -1.2) = -1.2 (clipped); r = 0.5, A = -1: max(0.5, 0.8) = 0.8 (clipped)
    out = pm.clipped_policy_loss(
        t([math.log(1.5), math.log(0.5)]), t([0.0, 0.0]), t([1.0, -1.0]), t([1, 1]), clip_range=0.2
    )
    assert out.loss.item() == pytest.approx((-1.2 + 0.8) / 2)
    assert out.clip_fraction.item() == pytest.approx(1.0)
    assert out.approx_kl.item() == pytest.approx(0.25 * (math.log(1.5) ** 2 + math.log(0.5) ** 2))
    # r = 0.5, A = 1: max(-0.5, -0.8) = -0.5, the unclipped term; the masked token is ignored
    out = pm.clipped_policy_loss(t([math.log(0.5), 5.0]), t([0.0, 0.0]), t([1.0, 7.0]), t([1, 0]))
    assert out.loss.item() == pytest.approx(-0.5)
    assert out.clip_fraction.item() == 0.0


def test_clipped_value_loss() -> None:
    # token 1: v=2 clipped to 1.5 (old 1, range 0.5); (2-3)^2 = 1 < (1.5-3)^2 = 2.25 -> 2.25
    # token 2: unchanged, (0-1)^2 = 1 either way; loss = 0.5 * (2.25 + 1) / 2
    out = pm.clipped_value_loss(t([2.0, 0.0]), t([1.0, 0.0]), t([3.0, 1.0]), t([1, 1]), clip_range=0.5)
    assert out.loss.item() == pytest.approx(0.8125)
    assert out.clip_fraction.item() == pytest.approx(0.5)


def test_entropy_of_uniform_is_log_n() -> None:
    assert pm.entropy_from_logits(torch.zeros(1, 4)).item() == pytest.approx(math.log(4))


def test_adaptive_kl_controller() -> None:
    # error clipped to +0.2: 0.2 * (1 + 0.2 * 256 / 10000) = 0.201024
    ctl = pm.AdaptiveKLController(0.2, target=6.0, horizon=10000)
    ctl.update(9.0, n_steps=256)
    assert ctl.value == pytest.approx(0.201024)
    # error 6.6/6 - 1 = 0.1, not clipped
    ctl = pm.AdaptiveKLController(0.2, target=6.0, horizon=10000)
    ctl.update(6.6, n_steps=256)
    assert ctl.value == pytest.approx(0.2 * (1 + 0.1 * 0.0256))
    # KL far below target: error clipped to -0.2, coefficient shrinks
    ctl.load_state_dict({"value": 0.2})
    ctl.update(0.0, n_steps=256)
    assert ctl.value == pytest.approx(0.2 * (1 - 0.2 * 0.0256))
    fixed = pm.FixedKLController(0.05)
    fixed.update(100.0, 256)
    assert fixed.value == 0.05


def test_k3_is_bounded() -> None:
    # log(q/p) = 20: unclipped k3 = e^20 - 21 ~ 4.9e8; clipped at 10 it is at most 10 nats.
    lp, ref = t([-20.0]), t([0.0])
    assert pm.kl_penalty(lp, ref, "k3").item() == pytest.approx(math.expm1(20) - 20)
    assert pm.kl_penalty(lp, ref, "k3", clip=10.0).item() == pytest.approx(10.0)
    # Inside the bound nothing changes: q/p = 0.5 gives -0.5 + log 2 as before.
    assert pm.kl_penalty(t([math.log(0.5)]), t([math.log(0.25)]), "k3", clip=10.0).item() == pytest.approx(
        -0.5 + math.log(2)
    )
    # k1 is linear in the log ratio and is not clipped.
    assert pm.kl_penalty(lp, ref, "k1", clip=10.0).item() == pytest.approx(-20.0)


def test_assemble_rewards_by_hand() -> None:
    # Row 0: log p = (-1, -2, -0.5), log q = (-1.5, -1, -0.5): k1 = (0.5, -1, 0).
    # Row 1: two real tokens then padding whose (garbage) log-probs must count for nothing.
    logprobs = t([-1.0, -2.0, -0.5], [-0.2, -0.3, -9.0])
    ref = t([-1.5, -1.0, -0.5], [-0.2, -0.5, -1.0])
    mask = t([1, 1, 1], [1, 1, 0])
    kl, rewards = pm.assemble_rewards(t([2.0, -1.0])[0], logprobs, ref, mask, kl_coef=0.1)
    assert kl.tolist()[0] == pytest.approx([0.5, -1.0, 0.0])
    assert kl.tolist()[1] == pytest.approx([0.0, 0.2, 0.0])
    # rewards = -0.1 * kl, score on the last real token: row 0 (-0.05, 0.1, 0 + 2), row 1 (0, -0.02 - 1, 0)
    assert rewards.tolist()[0] == pytest.approx([-0.05, 0.1, 2.0])
    assert rewards.tolist()[1] == pytest.approx([0.0, -1.02, 0.0])
    # k3 of row 0 token 1: log(q/p) = 1, e - 1 - 1 = 0.71828; with coefficient 0.5
    kl3, rewards3 = pm.assemble_rewards(t([0.0, 0.0])[0], logprobs, ref, mask, kl_coef=0.5, estimator="k3", clip=10.0)
    assert kl3[0, 1].item() == pytest.approx(math.e - 2)
    assert rewards3[0, 1].item() == pytest.approx(-0.5 * (math.e - 2))
    assert kl3[1, 2].item() == 0.0 and rewards3[1, 2].item() == 0.0


def test_running_moments_and_normalised_scores() -> None:
    moments = pm.RunningMoments()
    assert moments.std == 1.0  # nothing seen: no scale
    # First batch (10, 30): mean 20, population std 10 -> (-1, 1)
    assert pm.normalize_scores(t([10.0, 30.0])[0], moments).tolist() == pytest.approx([-1.0, 1.0])
    # Then (20, 60, 100): all five scores have mean 44 and variance (34^2+14^2+24^2+16^2+56^2)/5 = 1064
    out = pm.normalize_scores(t([20.0, 60.0, 100.0])[0], moments, clip=1.5)
    std = math.sqrt(1064)
    assert (moments.count, moments.mean, moments.std) == (5, pytest.approx(44.0), pytest.approx(std))
    assert out.tolist() == pytest.approx([(20 - 44) / std, (60 - 44) / std, 1.5])  # 56/32.6 = 1.72 clipped
    restored = pm.RunningMoments()
    restored.load_state_dict(moments.state_dict())
    assert (restored.count, restored.mean, restored.std) == (5, moments.mean, moments.std)


def test_response_mask() -> None:
    from tuneloop.trainer.ppo import response_mask

    eos, other_eos, pad = 2, 7, 0
    responses = torch.tensor(
        [
            [5, 6, eos, pad, pad],  # ends at the third token: it counts, the padding does not
            [5, 6, 8, 9, 4],  # cut at max_new_tokens: every token counts, no eos
            [eos, pad, pad, pad, pad],  # an immediate eos: one token
            [5, other_eos, 6, eos, pad],  # the first of several eos ids ends it
        ]
    )
    mask, ended = response_mask(responses, {eos, other_eos})
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]]
    assert ended.tolist() == [True, False, True, True]


def test_token_means_over_an_update_split_into_micro_batches() -> None:
    # Rows of 1 and 3 tokens: two micro-batch means would weigh the lone token like three.
    logprobs = torch.tensor([[-1.0, 0.0, 0.0], [-2.0, -0.5, -1.5]])
    old = torch.tensor([[-1.1, 0.0, 0.0], [-1.8, -0.5, -1.0]])
    adv = torch.tensor([[1.0, 0.0, 0.0], [-1.0, 2.0, 0.5]])
    mask = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    whole = pm.clipped_policy_loss(logprobs, old, adv, mask)
    count = mask.sum()
    parts = [pm.clipped_policy_loss(logprobs[i : i + 1], old[i : i + 1], adv[i : i + 1], mask[i : i + 1], count=count) for i in range(2)]
    assert torch.isclose(parts[0].loss + parts[1].loss, whole.loss)
    assert torch.isclose(parts[0].approx_kl + parts[1].approx_kl, whole.approx_kl)
    unweighted = sum(pm.clipped_policy_loss(logprobs[i : i + 1], old[i : i + 1], adv[i : i + 1], mask[i : i + 1]).loss for i in range(2)) / 2
    assert not torch.isclose(unweighted, whole.loss)


def test_whiten_with_an_all_reduce_uses_the_global_moments() -> None:
    x = torch.tensor([[1.0, 2.0, 0.0], [4.0, 8.0, 16.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    whole = pm.whiten(x, mask)
    # The other "process" holds row 1: an all-reduce adds its sums to row 0's.
    def other_sums(t: torch.Tensor) -> torch.Tensor:
        if t.dim() == 1:  # (sum, count)
            return t + torch.stack([(x[1] * mask[1]).sum(), mask[1].sum()])
        mean = (x * mask).sum() / mask.sum()
        return t + ((x[1] - mean) ** 2 * mask[1]).sum()

    part = pm.whiten(x[:1], mask[:1], all_reduce=other_sums)
    torch.testing.assert_close(part, whole[:1])
    assert not torch.allclose(pm.whiten(x[:1], mask[:1]), whole[:1])
