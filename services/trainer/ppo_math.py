"""The arithmetic of classic RLHF PPO (Ziegler et al. 2019; Stiennon et al. 2020), kept pure.

Every function takes `[batch, response_tokens]` tensors and a 0/1 `mask` of the same shape
that marks real response tokens (padding after the end of a response is 0). Nothing here
touches a model, so each formula can be checked against numbers worked out by hand
(tests/trainer/test_ppo_math.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

KLEstimator = Literal["k1", "k3"]
# Sums a tensor over the processes that each hold a part of a batch (torch.distributed's
# all_reduce); None: the batch is all here.
AllReduce = Callable[[torch.Tensor], torch.Tensor] | None


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None = None, count: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the masked entries; over `count` entries instead where the mean is over more
    tokens than these (an update split into micro-batches and processes)."""
    if mask is None:
        return x.mean()
    # An all-padding batch has no tokens to average; 0 is the neutral value for a loss.
    return (x * mask).sum() / (mask.sum() if count is None else count).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Population variance over the masked entries (what `tf.nn.moments` gave the original code)."""
    mean = masked_mean(x, mask)
    return masked_mean((x - mean) ** 2, mask)


def whiten(
    x: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    shift_mean: bool = True,
    eps: float = 1e-8,
    all_reduce: AllReduce = None,
) -> torch.Tensor:
    """Scales `x` to unit variance over the masked entries; centres it unless `shift_mean` is False.

    Advantages are fully whitened per batch (with `all_reduce`, by the moments of the whole
    batch across processes); scores are not whitened here but normalised by running
    statistics (`RunningMoments`). Masked entries come back as 0.
    """
    if all_reduce is None:
        mean, var = masked_mean(x, mask), masked_var(x, mask)
    else:
        m = torch.ones_like(x) if mask is None else mask
        total, count = all_reduce(torch.stack([(x * m).sum(), m.sum()])).unbind()
        mean = total / count.clamp(min=1)
        var = all_reduce(((x - mean) ** 2 * m).sum()) / count.clamp(min=1)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out if mask is None else out * mask


def kl_penalty(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: KLEstimator = "k1", clip: float | None = None
) -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from log-probs of tokens the policy sampled.

    k1 = log p - log q: unbiased, but single samples can be negative.
    k3 = (q/p - 1) - log(q/p): unbiased, never negative, lower variance (Schulman, "Approximating
    KL divergence", 2020). It grows like q/p, so one sampled tail token that the reference likes
    far more than the policy can outweigh a whole batch of scores; `clip` bounds the log ratio
    and the estimate to [0, clip] nats (as OpenRLHF does with 10). k1 is linear in the log ratio
    and is left as it is.
    """
    if estimator == "k1":
        return logprobs - ref_logprobs
    if estimator == "k3":
        log_ratio = ref_logprobs - logprobs
        if clip is not None:
            log_ratio = log_ratio.clamp(-clip, clip)
        k3 = torch.expm1(log_ratio) - log_ratio
        return k3 if clip is None else k3.clamp(max=clip)
    raise ValueError(f"unknown KL estimator {estimator!r}: use 'k1' or 'k3'")


def token_rewards(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> torch.Tensor:
    """Per-token rewards: -kl_coef * KL at every response token, plus the sequence score on the last one."""
    rewards = -kl_coef * kl * mask
    last = (mask.sum(dim=1).long() - 1).clamp(min=0)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last] += scores * (mask.sum(dim=1) > 0)
    return rewards


def assemble_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    estimator: KLEstimator = "k1",
    clip: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token KL on response tokens, per-token rewards): what the trainer feeds GAE with.

    One function from rollout numbers to rewards, so the assembly the trainer runs is the
    one the tests check by hand (padding carries neither KL nor score).
    """
    kl = kl_penalty(logprobs, ref_logprobs, estimator, clip) * mask
    return kl, token_rewards(scores, kl, mask, kl_coef)


class RunningMoments:
    """Mean and standard deviation of every score seen so far in a run.

    Scores are normalised by these rather than per batch: a batch's own statistics move
    with every batch (and are undefined for a batch of one), so the reward scale would
    change under the adaptive KL controller that is trying to track a fixed KL target.
    Merging uses the parallel update of Chan et al. (1979); the variance is the population one.
    """

    def __init__(self) -> None:
        self.count = 0
        self.mean = 0.0
        self.m2 = 0.0  # sum of squared deviations from the mean

    def update(self, x: torch.Tensor) -> None:
        n = x.numel()
        if n == 0:
            return
        values = x.detach().double().flatten()
        batch_mean = float(values.mean())
        batch_m2 = float(((values - batch_mean) ** 2).sum())
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean += delta * n / total
        self.m2 += batch_m2 + delta**2 * self.count * n / total
        self.count = total

    @property
    def std(self) -> float:
        # Too few scores (or all alike) give no scale yet: leave the scores unscaled.
        var = self.m2 / self.count if self.count > 1 else 0.0
        return var**0.5 if var > 1e-12 else 1.0

    def state_dict(self) -> dict[str, float]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.count, self.mean, self.m2 = int(state["count"]), float(state["mean"]), float(state["m2"])


def normalize_scores(scores: torch.Tensor, moments: RunningMoments, clip: float | None = None) -> torch.Tensor:
    """(score - running mean) / running std, within [-clip, clip]; `moments` first takes in `scores`."""
    moments.update(scores)
    out = (scores - moments.mean) / moments.std
    return out if clip is None else out.clamp(-clip, clip)


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over each masked response.

    The episode ends at the last masked token (the value after it is 0). Returns
    (advantages, returns = advantages + values), both 0 on padding.
    """
    steps = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    last_gae = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(steps)):
        next_mask = mask[:, t + 1] if t + 1 < steps else torch.zeros_like(mask[:, 0])
        next_value = values[:, t + 1] * next_mask if t + 1 < steps else torch.zeros_like(values[:, 0])
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last_gae = (delta + gamma * lam * next_mask * last_gae) * mask[:, t]
        advantages[:, t] = last_gae
    returns = (advantages + values) * mask
    return advantages, returns


@dataclass(frozen=True)
class PolicyLoss:
    loss: torch.Tensor
    clip_fraction: torch.Tensor  # share of tokens where the clipped term was the one used
    approx_kl: torch.Tensor  # 0.5 * E[(log ratio)^2]: how far this update moved from the rollout policy


def clipped_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float = 0.2,
    count: torch.Tensor | None = None,
) -> PolicyLoss:
    """PPO's clipped surrogate: mean over tokens of max(-A r, -A clip(r, 1-e, 1+e)), r = p/p_old.

    The mean is over the masked tokens, or over `count` tokens when these are part of a larger
    update (so every token weighs the same however the update is split).
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return PolicyLoss(
        loss=masked_mean(torch.maximum(unclipped, clipped), mask, count),
        clip_fraction=masked_mean((clipped > unclipped).float(), mask, count),
        approx_kl=masked_mean(0.5 * log_ratio**2, mask, count),
    )


@dataclass(frozen=True)
class ValueLoss:
    loss: torch.Tensor
    clip_fraction: torch.Tensor


def clipped_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float = 0.2,
    count: torch.Tensor | None = None,
) -> ValueLoss:
    """0.5 * mean over tokens of max((v - R)^2, (v_clipped - R)^2), v_clipped within clip_range of v_old
    (over `count` tokens as in `clipped_policy_loss`)."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    unclipped_loss = (values - returns) ** 2
    clipped_loss = (clipped_values - returns) ** 2
    return ValueLoss(
        loss=0.5 * masked_mean(torch.maximum(unclipped_loss, clipped_loss), mask, count),
        clip_fraction=masked_mean((clipped_loss > unclipped_loss).float(), mask, count),
    )


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of each position's next-token distribution, in nats."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


class FixedKLController:
    """A constant KL coefficient."""

    def __init__(self, kl_coef: float) -> None:
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        del current_kl, n_steps

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    """Ziegler et al. (2019), section 2.2: steer the KL coefficient so the observed KL tracks a target.

    e = clip(KL / target - 1, -0.2, 0.2);  beta <- beta * (1 + e * n_steps / horizon)
    where n_steps is the number of samples (episodes) since the last update.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float) -> None:
        if target <= 0 or horizon <= 0:
            raise ValueError("target and horizon must be positive")
        super().__init__(init_kl_coef)
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
