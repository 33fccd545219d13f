"""Rules that turn judgements into (chosen, rejected) training pairs.

Every rule is declared here, configured through `PairRules` (StoreSettings), and writes its
name into the `rule` column of each row it makes, so a dataset can be filtered by where its
pairs came from.

- `pairwise`: one row per event. A → (A, B); B → (B, A); tie → (A, B) labelled `tie`;
  both bad → (A, B) labelled `both_bad`. Ties and both-bad are kept, never dropped here: the
  trainer's data builder decides how they enter training.
- `ranking_all` (ranking="all"): a ranking c1 > c2 > ... > ck yields every ordered pair
  (ci, cj) with i < j, k(k-1)/2 rows. It uses all the information in the ranking, but the
  pairs of one ranking are correlated and the ranking weighs k(k-1)/2 times a pairwise event.
- `ranking_adjacent` (ranking="adjacent"): only (ci, ci+1), k-1 rows: the comparisons the
  annotator made most directly, and a ranking weighs no more than its k-1 decisions.
- `rating_margin`: two scores of different completions in the same group (see `same_group`)
  on the same scale, differing by at least `rating_margin` → (higher, lower). A smaller gap
  makes no pair; it is not a tie, because nobody judged the two equal.
- `thumbs`: a thumbs-up and a thumbs-down on different completions in the same group →
  (up, down). Two equal thumbs make no pair.

Ratings pair with ratings stored before them: a pair forms when the second of its two
ratings is stored, so each pair is made exactly once and carries that event's offset.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from tuneloop.v1 import feedback_pb2

PREFERENCE, TIE, BOTH_BAD = "preference", "tie", "both_bad"
LABELS = (PREFERENCE, TIE, BOTH_BAD)

RankingMode = Literal["all", "adjacent"]
RatingScope = Literal["request", "prompt"]


@dataclass(frozen=True)
class PairRules:
    """How ratings and rankings become pairs (fields documented in StoreSettings)."""

    ranking: RankingMode = "all"
    rating_pairs: bool = True
    rating_margin: float = 1.0
    thumbs_pairs: bool = True
    rating_scope: RatingScope = "prompt"
    rating_same_annotator: bool = True
    max_pairs: int = 64


@dataclass(frozen=True)
class Pair:
    chosen_id: str
    rejected_id: str
    label: str
    rule: str
    # For rating pairs: the earlier rating's event id (the pair stems from two events).
    other_event_id: str = ""


@dataclass(frozen=True)
class Rating:
    """One rating event, with what decides which other ratings it may pair with."""

    event_id: str
    completion_id: str
    tenant: str
    annotator_id: str
    request_id: str
    prompt_key: str
    kind: Literal["score", "thumb"]
    # The score, or 1.0 for thumbs up and 0.0 for thumbs down.
    value: float
    scale_min: float
    scale_max: float


def pairwise_pairs(choice: int, a: str, b: str) -> list[Pair]:
    if choice == feedback_pb2.PAIRWISE_CHOICE_A:
        return [Pair(a, b, PREFERENCE, "pairwise")]
    if choice == feedback_pb2.PAIRWISE_CHOICE_B:
        return [Pair(b, a, PREFERENCE, "pairwise")]
    if choice == feedback_pb2.PAIRWISE_CHOICE_TIE:
        return [Pair(a, b, TIE, "pairwise")]
    if choice == feedback_pb2.PAIRWISE_CHOICE_BOTH_BAD:
        return [Pair(a, b, BOTH_BAD, "pairwise")]
    raise ValueError(f"pairwise choice {choice} has no pair rule")


def ranking_pairs(ranked: Sequence[str], rules: PairRules) -> list[Pair]:
    """Pairs from completion ids ordered best first, at most `rules.max_pairs`: those of the
    closest ranks first (adjacent ones, then two apart, ...), which carry the finest signal."""
    if rules.ranking == "adjacent":
        pairs = [Pair(ranked[i], ranked[i + 1], PREFERENCE, "ranking_adjacent") for i in range(len(ranked) - 1)]
        return pairs[: rules.max_pairs]
    out: list[Pair] = []
    for gap in range(1, len(ranked)):
        for i in range(len(ranked) - gap):
            if len(out) == rules.max_pairs:
                return out
            out.append(Pair(ranked[i], ranked[i + gap], PREFERENCE, "ranking_all"))
    return out


def same_group(a: Rating, b: Rating, rules: PairRules) -> bool:
    """Whether two ratings are comparable: same tenant and kind, different completions of the
    same request (scope "request") or of the same prompt content across requests and model
    versions (scope "prompt"), by the same annotator unless `rating_same_annotator` is off
    (people use a scale differently), and for scores, on the same scale."""
    if a.tenant != b.tenant or a.kind != b.kind or a.completion_id == b.completion_id:
        return False
    if rules.rating_scope == "request" and a.request_id != b.request_id:
        return False
    if rules.rating_scope == "prompt" and a.prompt_key != b.prompt_key:
        return False
    if rules.rating_same_annotator and a.annotator_id != b.annotator_id:
        return False
    return a.kind == "thumb" or (a.scale_min, a.scale_max) == (b.scale_min, b.scale_max)


def rating_pairs(new: Rating, earlier: Iterable[Rating], rules: PairRules) -> list[Pair]:
    """Pairs between a newly stored rating and the ratings stored before it (oldest first), at
    most `rules.max_pairs`: with the latest comparable ones."""
    enabled = rules.rating_pairs if new.kind == "score" else rules.thumbs_pairs
    if not enabled:
        return []
    pairs: list[Pair] = []
    for old in reversed(list(earlier)):
        if len(pairs) == rules.max_pairs:
            break
        if not same_group(new, old, rules):
            continue
        gap = new.value - old.value
        if gap == 0 or (new.kind == "score" and abs(gap) < rules.rating_margin):
            continue
        rule = "rating_margin" if new.kind == "score" else "thumbs"
        better, worse = (new, old) if gap > 0 else (old, new)
        pairs.append(Pair(better.completion_id, worse.completion_id, PREFERENCE, rule, other_event_id=old.event_id))
    return pairs
