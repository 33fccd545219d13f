"""Preference rows' weights, honoured by how often a row is drawn.

The store gives every pair a `weight` (end users' feedback `end_user_weight`, annotators'
1). TRL's DPO and reward trainers have no per-row loss weight, so a weighted dataset is
sampled instead: each of an epoch's len(dataset) draws picks a row with probability
weight / sum(weights), with replacement. In expectation a row then counts in the loss in
proportion to its weight, as a weighted loss would, and a row of weight 0 is never drawn.

Only the training dataloader changes. TRL tokenises with `map`, which keeps the `weight`
column; the trainer drops unused columns only when it builds the dataloader, so the
weights are read from the trainer's prepared dataset, row for row the one the dataloader
draws from (TRL's length filter has already run).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

WEIGHT = "weight"


def row_weights(dataset: Any) -> list[float] | None:
    """The dataset's row weights when they change what is drawn: None without a `weight`
    column or when every row weighs the same (uniform draws are the trainer's own shuffle)."""
    if dataset is None or WEIGHT not in (getattr(dataset, "column_names", None) or ()):
        return None
    weights = [float(w) for w in dataset[WEIGHT]]
    check_weights(weights)
    if len(set(weights)) <= 1:
        return None
    return weights


def check_weights(weights: Sequence[float]) -> None:
    """Raise ValueError unless the weights can be drawn from: finite, not negative, not all 0."""
    bad = next((w for w in weights if not math.isfinite(w) or w < 0), None)
    if bad is not None:
        raise ValueError(f"row weight {bad} is not a finite number >= 0")
    if weights and not any(weights):
        raise ValueError("every row has weight 0: there is nothing to train on")


def weighted_sampler(weights: Sequence[float], seed: int) -> Any:
    """len(weights) draws with replacement, in proportion to the weights; one seed, one
    sequence of draws."""
    import torch

    generator = torch.Generator()
    generator.manual_seed(seed)
    return torch.utils.data.WeightedRandomSampler(
        list(weights), num_samples=len(weights), replacement=True, generator=generator
    )


class WeightedSampling:
    """Mixin for a transformers Trainer: draws training rows by their `weight` column."""

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        # `train_dataset` has lost the unused columns (weight among them); the prepared
        # dataset still has them, with the same rows in the same order.
        prepared = getattr(self, "train_dataset", None)
        weights = row_weights(prepared)
        if weights is None:
            return super()._get_train_sampler(train_dataset)  # type: ignore[misc]
        if train_dataset is not None and len(train_dataset) != len(weights):
            raise ValueError(f"{len(weights)} row weights for a dataset of {len(train_dataset)} rows")
        args = self.args  # type: ignore[attr-defined]
        return weighted_sampler(weights, args.data_seed if args.data_seed is not None else args.seed)


def weighted(trainer_cls: type) -> type:
    """`trainer_cls` drawing its training rows in proportion to their weight (unweighted
    datasets train exactly as with `trainer_cls`)."""
    return type(f"Weighted{trainer_cls.__name__}", (WeightedSampling, trainer_cls), {})
