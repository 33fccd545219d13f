"""The reward stage at label noise: pairs of which 15 % carry the wrong label (the annotator
picked the worse answer) still train a reward model that orders held-out answers by the truth.

The preference is a plain one a user would state (a helpful answer over a curt or evasive one),
on the demo's 130 user questions, each answered in several wordings, so the model cannot pass by
remembering a sentence. The gate measures on the held-out rows as labelled, noise included: it
cannot exceed about 0.85 there, and the test asserts it says so honestly. Accuracy against the
true labels is measured on the same held-out prompts through the Reward service's own scorer.
"""

from __future__ import annotations

import random
from pathlib import Path

import pandas as pd
import pytest

from tuneloop.common.registry import Registry
from tuneloop.trainer import reward_stage
from tuneloop.trainer.reward_stage import RewardStageConfig, split_by_prompt

PROMPTS = Path(__file__).resolve().parents[2] / "services" / "demo_data" / "prompts.txt"
FLIP = 0.15
HELPFUL = (
    "Good question. In short: {q} The key idea fits in a sentence, and I can go into more detail if that helps.",
    "Happy to help with that. {q} Here is the main point, followed by a simple example you can check.",
    "Let me answer directly. {q} The short version is below, with the one thing people often miss.",
)
UNHELPFUL = (
    "I don't know.",
    "Why would you ask me that? Look it up yourself.",
    "That is not something I will discuss.",
    "Whatever. It does not matter.",
)


def _questions() -> list[str]:
    lines = PROMPTS.read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def noisy_rows(seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(rows as judged, the same rows with the true labels): two judgements per question, each
    flipped with probability FLIP."""
    rng = random.Random(seed)
    truth, judged = [], []
    for i, q in enumerate(_questions()):
        prompt = [{"role": "user", "content": q}]
        for j in range(2):
            good = rng.choice(HELPFUL).format(q=f"You asked: {q}")
            bad = rng.choice(UNHELPFUL)
            row = dict(prompt=prompt, chosen=good, rejected=bad, label="preference", item_id=f"q{i}-{j}")
            truth.append(row)
            judged.append({**row, "chosen": bad, "rejected": good} if rng.random() < FLIP else row)
    return pd.DataFrame(judged), pd.DataFrame(truth)


@pytest.mark.heavy  # MiniLM (22.7M parameters), 40 optimizer steps of 16 pairs (3 epochs): minutes on two busy cores
@pytest.mark.timeout(1500)
def test_a_reward_model_trained_at_15_percent_flipped_labels_orders_held_out_answers_by_the_truth(
    tmp_path: Path,
) -> None:
    from tuneloop.common.model_import import import_minilm
    from tuneloop.reward.scorer import ModelScorer, agreement_with_labels
    from tuneloop.v1 import completion_pb2

    judged, truth = noisy_rows()
    flipped = float((judged["chosen"] != truth["chosen"]).mean())
    assert 0.10 <= flipped <= 0.20, flipped
    data = tmp_path / "rows.parquet"
    judged.to_parquet(data)
    folder = import_minilm(tmp_path / "minilm")
    config = RewardStageConfig(
        base_model=str(folder),
        dataset_path=data,
        registry_root=tmp_path / "registry",
        work_dir=tmp_path / "work",
        learning_rate=5e-5,
        batch_size=16,
        max_steps=40,
        min_accuracy=0.7,
        seed=0,
    )
    out = reward_stage.run(config).registered
    assert out is not None and out.promoted, out

    scorer = ModelScorer(Registry(tmp_path / "registry").resolve(out.ref), completion_pb2.ModelVersion(), "cpu", 512)
    _, held_truth = split_by_prompt(truth, config.eval_fraction, config.seed)
    _, held_judged = split_by_prompt(judged, config.eval_fraction, config.seed)
    true_accuracy = agreement_with_labels(held_truth, scorer)["accuracy"]
    # The stated bar: at 15 % noise the model still orders 95 % of held-out pairs as the truth does.
    assert true_accuracy >= 0.95, true_accuracy
    # The gate measured the labels as given: the share it reports is the share of rows whose
    # noisy label the model agrees with, so it sits near 1 - (flipped share of held-out rows).
    noisy_share = float((held_judged["chosen"] != held_truth["chosen"]).mean())
    gate = out.metrics["heldout"]["accuracy"]
    assert abs(gate - (1 - noisy_share)) <= 0.1, (gate, noisy_share)
