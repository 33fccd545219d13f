"""What the demo's product team asks of the model, one behaviour each: the rubric its
annotators judge pairs by, how the pairs come about, the success criteria declared before the
retrain and the retrain's recipe.

`tldr` is a format (answers open with a "TL;DR:" line), taught through an SFT candidate that
production is compared against. `concise` is a natural preference, taught from production's own
answers: two samples per prompt, and the annotators prefer the one that says it in fewer words.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TLDR = re.compile(r"^\s*TL;DR:", re.IGNORECASE)

# General-knowledge probes: never traffic, never training; a run that breaks one the parent got
# right is refused.
PROBES = [
    {"prompt": "What is the capital of France?", "expect": "Paris"},
    {"prompt": "What is the capital of Japan?", "expect": "Tokyo"},
    {"prompt": "How many days are there in a week?", "expect": "7"},
]

# The watch's held-out prompts per measurement: with the probes, eight answers (about 7 s here).
PROMPTS_PER_MEASUREMENT = 8 - len(PROBES)

# Every held-out prompt and probe of the criteria in one generate call: the 27 answers of the
# tldr criteria took 13 s against 29 s in batches of 8 (two cores), with the same greedy answers.
CRITERIA_BATCH = 32

DEGENERATION = {"ngram": 3, "max_repeated_ngram_ratio": 0.3, "max_non_ascii_ratio": 0.05, "language": "en",
                "max_wrong_language_rate": 0.1}


def native_bf16() -> bool:
    """Whether training here should run in bf16 mixed precision: on a GPU that has it (the
    trainer's own default), or a CPU with bf16 instructions (AVX512-BF16, AMX), where a
    SmolLM2 training step took 3.2 s against 4.9 s in fp32 on two cores. Without them bf16 is
    emulated and slower than fp32."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


@dataclass(frozen=True)
class Answer:
    content: str
    cut: bool  # stopped at the token limit, not by the model


@dataclass(frozen=True)
class Behaviour:
    name: str
    declared: str  # what the product team asks for, in a sentence
    feedback_criteria: list[str]
    # The rubric the annotators apply to a pair: "a", "b", "tie" or "both_bad".
    rubric: Callable[[Answer, Answer], str]
    # Answers stop here in the samples, the comparisons and the evaluation.
    max_tokens: int
    # Production's answer rewritten to show the behaviour: demonstrations for an SFT candidate
    # that production is compared with. None: two of production's own answers are compared
    # (on-policy pairs).
    demonstrate: Callable[[str], str] | None
    comparisons_per_prompt: int
    # The generation services' engine (TUNELOOP_GENERATION_ENGINE), and the criteria's.
    engine: str
    checks: list[dict[str, Any]]
    criteria_extra: dict[str, Any]
    recipe: dict[str, Any]  # the retrain's `dpo` section, less max_steps
    steps: int
    fast_steps: int
    reward_steps: int  # the reward model's training steps (batch 8)
    cut_answers: str  # PreferenceSource.cut_answers

    @property
    def sft_candidate(self) -> bool:
        return self.demonstrate is not None

    def criteria(self, held_out: list[str]) -> dict[str, Any]:
        return {
            "name": f"{self.name}-v1",
            # The criteria answer on the services' engine: what pays for the comparisons pays
            # for these answers too.
            "generation": {"max_new_tokens": self.max_tokens, "batch_size": CRITERIA_BATCH, "engine": self.engine},
            "held_out_prompts": held_out,
            "behaviour": self.checks,
            "probes": {"items": PROBES, "min_pass_rate": 0.66},
            "degeneration": DEGENERATION,
            **self.criteria_extra,
        }

    def retrain_config(self, store_root: Path, tenant: str, criteria: Path, fast: bool = False) -> dict[str, Any]:
        """The scheduled retrain's config (RetrainConfig) for this behaviour."""
        steps = self.fast_steps if fast else self.steps
        return {
            "policy_name": "policy", "reward_name": "reward",
            "preferences": {"store_root": str(store_root), "tenants": [tenant], "snapshot": "latest",
                            "tie_policy": "drop", "both_bad_policy": "drop", "cut_answers": self.cut_answers},
            "criteria": str(criteria),
            "gates": {"min_new_pairs": 16, "min_agreement": 0.65, "min_kappa": 0.4, "min_anchor_accuracy": 0.75},
            "reward_model": {"base_model": "reward@v0001", "min_accuracy": 0.6, "max_steps": self.reward_steps,
                             "batch_size": 8},
            "algorithm": "dpo",
            # The watch measures before training, halfway and at the end.
            "dpo": {**self.recipe, "max_steps": steps, "bf16": native_bf16(),
                    "watch": {"eval_every": max(steps // 2, 1), "eval_prompts": PROMPTS_PER_MEASUREMENT,
                              "min_change": 0.1}},
        }


def with_tldr(answer: str) -> str:
    """The TL;DR behaviour applied to an answer: its first sentence becomes the TL;DR line and
    the rest follows (a first sentence too long for one line is cut there and kept below)."""
    text = " ".join(answer.split())
    m = re.match(r"(.+?[.!?])(\s|$)", text)
    first = m.group(1) if m else text
    if len(first) > 160:
        return f"TL;DR: {first[:157].rsplit(' ', 1)[0]}...\n\n{answer.strip()}"
    rest = text[len(first):].strip()
    return f"TL;DR: {first}" + (f"\n\n{rest}" if rest else "")


def _tldr_choice(a: Answer, b: Answer) -> str:
    """The answer that opens with a TL;DR line is better (the line shows in a cut answer too)."""
    has_a, has_b = bool(TLDR.match(a.content)), bool(TLDR.match(b.content))
    if has_a and not has_b:
        return "a"
    if has_b and not has_a:
        return "b"
    return "tie" if has_a else "both_bad"


CONCISE_TIE = 0.2  # complete answers whose word counts differ by at most this share are a tie


def _concise_choice(a: Answer, b: Answer) -> str:
    """A complete answer beats one cut off before it ended; of two complete answers the one in
    clearly fewer words is better, and answers of about the same length are a tie; two cut
    answers are both bad."""
    if a.cut and b.cut:
        return "both_bad"
    if a.cut != b.cut:
        return "b" if a.cut else "a"
    wa, wb = len(a.content.split()), len(b.content.split())
    if abs(wa - wb) <= CONCISE_TIE * max(wa, wb):
        return "tie"
    return "a" if wa < wb else "b"


BEHAVIOURS = {
    "tldr": Behaviour(
        name="tldr",
        declared='answers open with a one-line summary, "TL;DR: ..."',
        feedback_criteria=["opens-with-tldr", "helpfulness"],
        rubric=_tldr_choice,
        max_tokens=64,
        demonstrate=with_tldr,
        comparisons_per_prompt=1,
        # 79 comparisons of 64 tokens on two services: vLLM's start would cost more than it
        # saves. The same for the retrain's 27 answers of the criteria (transformers 13 s in
        # one batch, vLLM 53 s to start and 8 s to answer), and an engine kept for the watch's
        # measurements made the DPO steps around it about a quarter slower on two cores.
        engine="transformers",
        checks=[
            {"name": "opens-with-tldr", "kind": "regex", "pattern": TLDR.pattern, "min_pass_rate": 0.9},
            {"name": "answers-not-refusals", "kind": "refusal", "expect_refusal": False, "min_pass_rate": 0.9},
        ],
        criteria_extra={
            "reward": {"min_win_rate": 0.55},
            # The TL;DR line is a deliberate change of the answers' opening tokens: a KL bound
            # that allows it but catches a collapse.
            "kl": {"max_kl": 60.0},
            "length_drift": {"min_ratio": 0.5, "max_ratio": 1.6},
        },
        # DPO's pairwise loss plus an NLL term on the chosen answers (RPO): plain DPO mostly
        # pushed the rejected answers down, and a 135M model drifted to other personas before
        # its greedy answers opened with the TL;DR line.
        recipe={"beta": 0.1, "loss_type": ["sigmoid", "sft"], "learning_rate": 5e-5, "per_device_train_batch_size": 4,
                "max_length": 256, "save_steps": 8},
        # All held-out answers opened with the TL;DR line after 12 and 16 steps too, but such
        # runs (with a 16-step SFT candidate) turned "What is the capital of France?" into a
        # French-speaking persona and were refused in 2 of 5; the 24-step recipe is the one
        # with the record.
        steps=24,
        fast_steps=12,
        # About an epoch of the judgements: the reward model's held-out pair accuracy was 0.89
        # after half of one, 0.975 after two.
        reward_steps=24,
        # Answers stop at max_tokens, and the behaviour is judged on an answer's first line: a
        # cut answer shows it as well as a complete one.
        cut_answers="keep",
    ),
    "concise": Behaviour(
        name="concise",
        declared="answers say what was asked in few words and end, rather than run on",
        feedback_criteria=["concise", "complete"],
        rubric=_concise_choice,
        max_tokens=128,
        demonstrate=None,
        # About four in ten comparisons have exactly one complete answer or two of clearly
        # different lengths: two per prompt give the retrain about 80 pairs.
        comparisons_per_prompt=2,
        # 208 comparisons of two 128-token answers on one service: the transformers engine took
        # 11 minutes for them.
        engine="vllm",
        checks=[
            # Finished within 90 words (an answer cut at 128 tokens has about 95-115), and not
            # collapsed to a word or two.
            {"name": "concise", "kind": "length", "min_words": 3, "max_words": 90, "min_pass_rate": 0.6},
            {"name": "answers-not-refusals", "kind": "refusal", "expect_refusal": False, "min_pass_rate": 0.9},
        ],
        criteria_extra={
            "reward": {"min_win_rate": 0.55},
            "kl": {"max_kl": 80.0},
            # Shorter answers are the point; longer ones would be the opposite of it.
            "length_drift": {"min_ratio": 0.2, "max_ratio": 1.1},
        },
        recipe={"beta": 0.1, "loss_type": ["sigmoid", "sft"], "learning_rate": 5e-5, "per_device_train_batch_size": 4,
                "max_length": 384, "save_steps": 8, "save_total_limit": 3},
        steps=24,
        fast_steps=12,
        reward_steps=60,
        # A cut answer is the rejected side of most pairs, which is what the rubric means; a
        # cut chosen answer would teach running on.
        cut_answers="drop_if_chosen_cut",
    ),
}
