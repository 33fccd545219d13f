"""Reward-model stage: Bradley–Terry training on preference rows, a held-out gate, and
registration of the result (promoted only when the gate passes).

Rows are split by prompt, never by row: two judgements of one prompt on both sides of
the split would let the model pass the gate by remembering the prompt.

Ties and both-bad carry no order, so they are dropped by default. Entering a tie as one
pair with margin 0 would still train `chosen` above `rejected` (BT's loss keeps pushing
r_a - r_b up at any margin), which orders two answers the annotator called equal. With
the "symmetric" rule a tie enters as both orders (a, b) and (b, a): the two BT terms sum to
-log σ(d) - log σ(-d), smallest at d = 0, so the model learns to score the two alike.
Both-bad says nothing about the two answers' relative order either and takes the same
two rules.

Inputs are tokenised by `tuneloop.common.reward_format.encode`, the function the Reward
service scores with; TRL gets the token ids, so its own text handling (eos appending,
special tokens) never applies.

A `weight` column (the store's per-row weight) sets how often each pair is drawn
(`honour_weight`, weighting.py); both orders of a symmetric tie take their row's weight.

Rows are read by `data.load_preferences`, as every stage reads them (retrain hands over the
snapshot it pinned instead). Training takes the other stages' device choices (`DeviceParams`:
bf16, activation checkpointing, optimizer, `trl_args`) and LoRA: with `lora.enabled` the
adapters train and the new scalar head trains in full (peft keeps a sequence classifier's
head trainable), and the adapters are merged before the model is registered, so the
Reward service loads a plain model.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from tuneloop.common import reward_format as rf
from tuneloop.trainer.config import DeviceParams, PreferenceSource
from tuneloop.trainer.distributed import check_ranks_agree, on_main, world_size
from tuneloop.trainer.weighting import check_weights, weighted

if TYPE_CHECKING:
    import pandas as pd

    from tuneloop.common.registry import Registry
    from tuneloop.trainer.data import PreferenceData
    from tuneloop.trainer.stages import StageResult

log = logging.getLogger(__name__)

Rule = Literal["drop", "symmetric"]


class RewardParams(DeviceParams):
    """How the reward model trains and is judged: the `reward` stage's fields but its data,
    backbone and registry name."""

    alias: str = Field("production", description="Alias moved to the new version when the gate passes.")
    promote: bool = Field(True, description="Move the alias when the gate passes (False: register only).")
    work_dir: Path | None = Field(None, description="Scratch folder for the trainer; default a temporary one.")
    eval_fraction: float = Field(0.2, gt=0, lt=1, description="Share of prompts held out for the gate.")
    seed: int = Field(0, ge=0, description="Seed of the prompt split, the head's init and data order.")
    ties: Rule = Field("drop", description="How ties enter training: 'drop' or 'symmetric' (both orders).")
    both_bad: Rule = Field("drop", description="How both-bad pairs enter training: 'drop' or 'symmetric'.")
    epochs: float = Field(1.0, gt=0, description="Passes over the training pairs (ignored when max_steps > 0).")
    max_steps: int = Field(-1, ge=-1, description="Optimizer steps; -1 means use epochs.")
    learning_rate: float = Field(1e-4, gt=0, lt=1, description="Peak AdamW learning rate.")
    batch_size: int = Field(8, ge=1, le=1024, description="Preference pairs per optimizer step (per process).")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Share of steps spent warming up the learning rate.")
    max_length: int = Field(512, ge=8, description="Longest encoded pair trained on; longer pairs are dropped.")
    eval_batch_size: int = Field(32, ge=1, description="Pairs per forward pass when scoring held-out rows.")
    min_accuracy: float = Field(0.6, ge=0, le=1, description="Held-out pairwise accuracy needed to promote.")
    min_eval_pairs: int = Field(20, ge=1, description="Fewest held-out preference pairs the gate will judge on.")


class RewardModelParams(RewardParams):
    """retrain's `reward_model`: the reward stage's fields but those the pipeline sets itself
    (its data, the registry and name, honour_weight); an unknown one fails the config."""

    base_model: str | None = Field(
        None, description="Backbone (registry ref or folder); unset: <reward_name>@production, the one served."
    )


class RewardStageConfig(RewardParams):
    """Configuration of one reward-model training run (YAML keys are the field names)."""

    base_model: str = Field(
        description="Backbone: a registry ref (reward@production, policy@v0002) or a model folder. "
        "A causal LM gets a new scalar head (policy family); an encoder such as MiniLM works as is.",
    )
    dataset_path: Path | None = Field(
        None, description="Preference rows as Parquet, JSON lines, CSV, or a `datasets` save_to_disk folder."
    )
    store_root: str | None = Field(
        None, description="Preference store root, a folder or URL (instead of dataset_path)."
    )
    snapshot: str | None = Field(
        None, pattern=r"^pairs@\d+$", description="Store snapshot id (pairs@<version>) to train on; default the newest."
    )
    tenants: list[Annotated[str, Field(min_length=1)]] = Field(
        default_factory=list,
        description="With store_root, the tenants whose rows it may use (required: there is no implicit 'all'); "
        "each judge's latest answer per item only.",
    )
    max_tenant_share: float | None = Field(
        None, gt=0, le=1, description="Most share of the rows any one tenant may have (null: no cap)."
    )
    registry_root: Path | None = Field(
        None, description="Registry root; default from TUNELOOP_REGISTRY_ROOT (RegistrySettings)."
    )
    name: str = Field("reward", description="Registry name the trained model is registered under.")
    honour_weight: bool = Field(
        True,
        description="Draw pairs in proportion to their rows' `weight` column (TRL has no per-row loss weight); "
        "a row of weight 0 is never drawn. False, or no such column: every pair counts alike.",
    )

    @field_validator("store_root", mode="before")
    @classmethod
    def _root_as_text(cls, value: object) -> object:
        return os.fspath(value) if isinstance(value, os.PathLike) else value

    @model_validator(mode="after")
    def _one_source(self) -> RewardStageConfig:
        if (self.dataset_path is None) == (self.store_root is None):
            raise ValueError("give exactly one of dataset_path or store_root")
        if self.snapshot is not None and self.store_root is None:
            raise ValueError("snapshot needs store_root")
        if self.store_root is not None and not self.tenants:
            raise ValueError("tenants: name the tenants whose preferences the reward model may use")
        return self

    def preferences(self) -> PreferenceSource:
        """Its data as the other stages name theirs (read by data.load_preferences)."""
        return PreferenceSource(
            store_root=self.store_root,
            snapshot=self.snapshot or "latest",
            path=self.dataset_path,
            tenants=self.tenants,
            max_tenant_share=self.max_tenant_share,
            honour_weight=self.honour_weight,
        )


# ---- data --------------------------------------------------------------------------------


def split_by_prompt(rows: pd.DataFrame, eval_fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, held-out): every row of a prompt lands on the same side; seeded."""
    keys = np.array(sorted({rf.prompt_key(p) for p in rows["prompt"]}))
    if len(keys) < 2:
        raise ValueError(f"need at least 2 distinct prompts to hold some out, got {len(keys)}")
    np.random.default_rng(seed).shuffle(keys)
    n_eval = min(len(keys) - 1, max(1, math.ceil(len(keys) * eval_fraction)))
    held_out = set(keys[:n_eval])
    mask = np.array([rf.prompt_key(p) in held_out for p in rows["prompt"]])
    return rows[~mask].reset_index(drop=True), rows[mask].reset_index(drop=True)


def training_pairs(
    rows: pd.DataFrame, ties: Rule, both_bad: Rule
) -> tuple[list[tuple[rf.Prompt, str, str]], dict[str, int]]:
    """(prompt, better, worse) triples after the tie and both-bad rules, and counts of each fate."""
    pairs, _, counts = weighted_training_pairs(rows, ties, both_bad)
    return pairs, counts


def weighted_training_pairs(
    rows: pd.DataFrame, ties: Rule, both_bad: Rule
) -> tuple[list[tuple[rf.Prompt, str, str]], list[float], dict[str, int]]:
    """`training_pairs`, and each pair's weight: its row's `weight` (1 where there is none)."""
    rules = {"tie": ties, "both_bad": both_bad}
    pairs: list[tuple[rf.Prompt, str, str]] = []
    weights: list[float] = []
    counts = {"preference": 0, "tie": 0, "both_bad": 0, "dropped_tie": 0, "dropped_both_bad": 0}
    row_weights = rows["weight"].fillna(1.0) if "weight" in rows.columns else [1.0] * len(rows)
    for r, weight in zip(rows.itertuples(), row_weights, strict=True):
        counts[r.label] += 1
        if r.label == "preference":
            made = [(r.prompt, r.chosen, r.rejected)]
        elif rules[r.label] == "symmetric":
            made = [(r.prompt, r.chosen, r.rejected), (r.prompt, r.rejected, r.chosen)]
        else:
            counts[f"dropped_{r.label}"] += 1
            made = []
        pairs += made
        weights += [float(weight)] * len(made)
    return pairs, weights, counts


# ---- the stage ---------------------------------------------------------------------------


def _gate(config: RewardParams, heldout: dict[str, Any]) -> str | None:
    """Why the model may not be promoted, or None when it may."""
    if heldout["pairs"] < config.min_eval_pairs:
        return (
            f"held-out set has {heldout['pairs']} preference pairs, fewer than min_eval_pairs={config.min_eval_pairs}"
        )
    if heldout["accuracy"] < config.min_accuracy:
        return f"held-out pairwise accuracy {heldout['accuracy']:.3f} is below min_accuracy={config.min_accuracy}"
    return None


def run(
    config: RewardStageConfig, *, data: PreferenceData | None = None, registry: Registry | None = None
) -> StageResult:
    """Train, evaluate on held-out prompts, register; promote only if the gate passes.

    `data`: the config's preferences when the caller has read them already (retrain's pinned
    snapshot); `registry`: the registry to write to (retrain's publishes model events). The
    result's `registered` holds the version, the gate's verdict and the metrics, as in the
    version's card.
    """
    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    from tuneloop.trainer.data import load_preferences
    from tuneloop.trainer.modeling import lora_config, registry as open_registry, save_final, trl_args
    from tuneloop.trainer.stages import Registration, StageResult

    started = time.monotonic()
    reg = registry or open_registry(config.registry_root)
    base_folder = reg.resolve(config.base_model)
    parent = reg.card(config.base_model).ref if "@" in config.base_model else None

    if data is None:
        data = load_preferences(config.preferences())
    rows = rf.prepare_rows(data.rows)
    train_rows, eval_rows = split_by_prompt(rows, config.eval_fraction, config.seed)

    tokenizer = AutoTokenizer.from_pretrained(base_folder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)  # a new scalar head is initialised here
        model = AutoModelForSequenceClassification.from_pretrained(base_folder, num_labels=1, dtype=torch.float32)
    rf.prepare_tokenizer(tokenizer, model)

    def scorer(m: Any) -> rf.ScoreFn:
        return lambda prompts, responses: rf.score_pairs(m, tokenizer, prompts, responses, config.eval_batch_size)

    model.eval()
    before = rf.pairwise_accuracy(eval_rows, scorer(model), config.eval_batch_size)

    pairs, weights, counts = weighted_training_pairs(train_rows, config.ties, config.both_bad)
    encoded = [(rf.encode(tokenizer, p, good), rf.encode(tokenizer, p, bad)) for p, good, bad in pairs]
    kept = [(c, r, w) for (c, r), w in zip(encoded, weights, strict=True) if max(len(c), len(r)) <= config.max_length]
    counts["dropped_too_long"] = len(encoded) - len(kept)
    if not kept:
        raise ValueError(f"no training pairs left (counts: {counts})")
    columns = {"chosen_ids": [c for c, _, _ in kept], "rejected_ids": [r for _, r, _ in kept]}
    if config.honour_weight:
        columns["weight"] = [w for _, _, w in kept]
        check_weights(columns["weight"])
    dataset = Dataset.from_dict(columns)

    if config.work_dir is not None:
        config.work_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="reward-stage-", dir=config.work_dir) as scratch:
        args = trl_args(
            RewardConfig,
            config,
            Path(scratch),
            per_device_train_batch_size=config.batch_size,
            num_train_epochs=config.epochs,
            warmup_steps=config.warmup_ratio,  # a float below 1 is a share of the steps
            max_length=None,  # filtered above, with the count reported
            save_strategy="no",  # one short run; its result is registered, not resumed
            eval_strategy="no",
            logging_steps=10,
            dataloader_pin_memory=False,
        )
        trainer = weighted(RewardTrainer)(
            model=model,
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=lora_config(config.lora, task_type="SEQ_CLS"),  # the new head trains in full
        )
        train_out = trainer.train()
        model = trainer.model
        model.eval()
        digest = check_ranks_agree(model)
        after = rf.pairwise_accuracy(eval_rows, scorer(model), config.eval_batch_size)

        refused = _gate(config, after)
        metrics = {
            "data": data.source,
            "heldout": after,
            "heldout_before": before,
            "train_loss": float(train_out.training_loss),
            "train_steps": int(train_out.global_step),
            "train_pairs": len(kept),
            "train_prompts": len({rf.prompt_key(p) for p in train_rows["prompt"]}),
            "eval_prompts": len({rf.prompt_key(p) for p in eval_rows["prompt"]}),
            "rows": counts,
            "gate": {
                "min_accuracy": config.min_accuracy,
                "min_eval_pairs": config.min_eval_pairs,
                "passed": refused is None,
                "refused_reason": refused,
            },
            "stage_seconds": round(time.monotonic() - started, 1),
        }
        promoted = refused is None and config.promote

        def save_and_register() -> Registration:
            # LoRA adapters are merged: the Reward service loads a plain model.
            out = save_final(model, tokenizer, Path(scratch) / "model")
            card = reg.register(
                config.name,
                out,
                kind="reward",
                parent=parent,
                dataset_snapshot=data.offsets,
                training_config=config.model_dump(mode="json"),
                metrics=metrics,
                description=f"Bradley–Terry reward model trained from {config.base_model}",
                move=True,
            )
            if promoted:
                reg.promote(config.name, card.version, config.alias)
            return Registration(card.ref, card.version, promoted, refused, metrics)

        # Under several processes one version is registered (and promoted), by the main one.
        registered = on_main(save_and_register)
    if promoted:
        log.info("reward model promoted", extra={"fields": {"ref": registered.ref, "accuracy": after["accuracy"]}})
    else:
        log.warning("reward model not promoted", extra={"fields": {"ref": registered.ref, "reason": refused}})
    return StageResult(
        stage="reward",
        model_dir=str(reg.resolve(registered.ref)),
        steps=int(train_out.global_step),
        train_loss=float(train_out.training_loss),
        seconds=round(time.monotonic() - started, 2),
        resumed_from=None,
        processes=world_size(),
        weights_sha256=digest,
        registered=registered,
    )
