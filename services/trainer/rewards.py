"""Reward functions for online RL and evaluation, in TRL's shape:
`f(prompts, completions, **kwargs) -> list[float]`.

Local reward models score through `tuneloop.common.reward_format.score_pairs`, the one
encoding the reward stage trains with and the Reward service serves with. Remote scoring
goes through the Reward service's client.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tuneloop.trainer.config import RewardSource
from tuneloop.trainer.modeling import resolve

RewardFunc = Callable[..., list[float]]


def completion_text(completion: Any) -> str:
    """TRL passes conversational completions as [{'role': 'assistant', 'content': ...}]."""
    if isinstance(completion, str):
        return completion
    return "".join(str(m["content"]) for m in completion)


class LocalReward:
    """A reward model folder, loaded once, scored in batches without gradients."""

    def __init__(self, path: Path, batch_size: int = 16) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from tuneloop.common import reward_format as rf

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32)
        rf.prepare_tokenizer(self.tokenizer, self.model)
        self.model.eval()
        self.batch_size = batch_size

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **_: Any) -> list[float]:
        import torch

        from tuneloop.common import reward_format as rf

        texts = [completion_text(c) for c in completions]
        with torch.no_grad():
            return rf.score_pairs(
                self.model, self.tokenizer, [rf.normalize_prompt(p) for p in prompts], texts, self.batch_size
            )


def reward_function(source: RewardSource, registry_root: Path | None = None) -> RewardFunc:
    """A named function (TRL logs rewards under the function's __name__)."""
    if source.target is not None:
        from tuneloop.reward.client import RewardClient

        remote: RewardFunc = RewardClient(source.target).as_reward_func()
        return remote
    scorer = LocalReward(resolve(source.model, registry_root), source.batch_size)  # type: ignore[arg-type]

    def reward_model(prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
        return scorer(prompts, completions, **kwargs)

    return reward_model
