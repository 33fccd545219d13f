"""Annotation quality over the raw judgements: how much annotators agree, and how well each
one matches the known answers of anchor items over time (drift). Every figure is one
tenant's: another tenant's judgements (even of the same item ids, by annotators of the same
names) never enter it, nor define its known answers.

Labels. Agreement compares judgements of one item (`item_id`). A verdict becomes a label
relative to the item's completions sorted by id, so a category means the same on every item
whatever order A and B were shown in: pairwise → "first" / "second" (the preferred
completion's place among the sorted ids), "tie", "both_bad"; rating → the score, "up",
"down"; ranking → the places best first ("1>0>2"). Per item, each annotator counts once,
with their latest judgement.

- Percent agreement: per item judged by at least two annotators, the share of annotator
  pairs giving the same label; the mean over those items.
- Kappa: Cohen's (scikit-learn) when exactly two annotators judged those items, Fleiss'
  (statsmodels) when more did. Fleiss' kappa needs as many ratings on every item: with m the
  fewest annotators on an item, each item keeps its m earliest annotators (a calibration
  round, where everyone judges every item, loses nothing). Kappa is NaN where it is
  undefined: nothing to compare, or every label the same (no chance model to correct for).
- Majority agreement: per annotator, the share of the multi-annotated items they judged on
  which their label is the item's plurality label; items whose plurality is tied count for
  nobody.

Anchors. Known answers come from, by precedence:
1. `anchors.json` in the store root: `{"answers": {item_id: answer}, "gold_annotators":
   [annotator ids]}` (a bare `{item_id: answer}` object is read as answers). An answer is
   written like the verdict it must match: the preferred completion id, "tie", "both_bad", a
   score, "up"/"down" (or true/false), or a list of completion ids best first.
2. Events flagged `anchor` by a gold annotator: the latest one per item is its answer.
Every judgement of an item with a known answer, by anyone but a gold annotator, is an
anchor judgement: anchor accuracy is their share judged as the answer, over all time and
over the annotator's `recent` latest ones. Recent accuracy falling below the all-time
figure is drift.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from tuneloop.v1 import feedback_pb2

ANCHORS_FILE = "anchors.json"
# Anchor judgements in the "recent" window of each annotator.
RECENT_ANCHORS = 20

NAN = float("nan")


@dataclass(frozen=True)
class AnnotatorQuality:
    annotator_id: str
    anchors: int
    anchor_accuracy: float
    recent_anchor_accuracy: float
    majority_agreement: float


@dataclass(frozen=True)
class Agreement:
    items: int
    judgements: int
    annotator_count: int
    percent_agreement: float
    kappa: float
    kappa_method: str
    annotators: list[AnnotatorQuality]

    def to_proto(self) -> feedback_pb2.AgreementReport:
        return feedback_pb2.AgreementReport(
            items=self.items,
            judgements=self.judgements,
            annotators=self.annotator_count,
            percent_agreement=self.percent_agreement,
            kappa=self.kappa,
            kappa_method=self.kappa_method,
            annotators_quality=[
                feedback_pb2.AnnotatorQuality(
                    annotator_id=q.annotator_id,
                    anchors=q.anchors,
                    anchor_accuracy=q.anchor_accuracy,
                    recent_anchor_accuracy=q.recent_anchor_accuracy,
                    majority_agreement=q.majority_agreement,
                )
                for q in self.annotators
            ],
        )


def item_label(kind: str, choice: str, completion_ids: Iterable[str]) -> str:
    """A verdict relative to the item's sorted completion ids (see the module doc)."""
    order = {c: str(i) for i, c in enumerate(sorted(completion_ids))}
    if kind == "pairwise":
        return {"0": "first", "1": "second"}.get(order.get(choice, ""), choice)
    if kind == "ranking":
        return ">".join(order.get(c, c) for c in choice.split(">"))
    return choice


def normalise_answer(answer: object) -> str:
    """An anchors.json answer written the way the judgements table writes choices."""
    if isinstance(answer, bool):
        return "up" if answer else "down"
    if isinstance(answer, int | float):
        return f"{float(answer):g}"
    if isinstance(answer, list):
        return ">".join(str(a) for a in answer)
    return str(answer)


@dataclass(frozen=True)
class KnownAnswers:
    answers: dict[str, str]
    gold: frozenset[str]


def read_anchors_file(root: Path | str) -> KnownAnswers:
    from tuneloop.store.read import anchors_text

    text = anchors_text(root)
    if text is None:
        return KnownAnswers({}, frozenset())
    data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"{Path(root) / ANCHORS_FILE}: expected a JSON object")
    if "answers" in data or "gold_annotators" in data:
        answers, gold = data.get("answers", {}), data.get("gold_annotators", [])
    else:
        answers, gold = data, []
    return KnownAnswers({str(k): normalise_answer(v) for k, v in answers.items()}, frozenset(map(str, gold)))


def known_answers(judgements: pd.DataFrame, file: KnownAnswers) -> dict[str, str]:
    """Item id → answer: gold annotators' anchor events, overridden by the file."""
    gold = judgements[judgements["anchor"] & judgements["annotator_id"].isin(file.gold)]
    latest = gold.sort_values("created_at", kind="stable").drop_duplicates("item_id", keep="last")
    return {**dict(zip(latest["item_id"], latest["choice"], strict=True)), **file.answers}


def measure(
    judgements: pd.DataFrame,
    answers: Mapping[str, str] | None = None,
    gold: Iterable[str] = (),
    recent: int = RECENT_ANCHORS,
) -> Agreement:
    """Agreement and annotator quality over `judgements` (columns of the judgements table:
    item_id, annotator_id, kind, choice, completion_ids, anchor, created_at)."""
    ordered = judgements.sort_values("created_at", kind="stable")
    latest = ordered.drop_duplicates(["item_id", "annotator_id"], keep="last").copy()
    latest["label"] = [
        item_label(k, c, ids)
        for k, c, ids in zip(latest["kind"], latest["choice"], latest["completion_ids"], strict=True)
    ]
    per_item = latest.groupby("item_id", sort=True)
    multi = latest[per_item["annotator_id"].transform("size") >= 2]
    items = [group for _, group in multi.groupby("item_id", sort=True)]
    kappa, method = _kappa(items)
    quality = _quality(ordered, items, dict(answers or {}), frozenset(gold), recent)
    return Agreement(
        items=len(items),
        judgements=len(multi),
        annotator_count=int(multi["annotator_id"].nunique()),
        percent_agreement=float(np.mean([_pair_agreement(g["label"]) for g in items])) if items else NAN,
        kappa=kappa,
        kappa_method=method,
        annotators=quality,
    )


def _pair_agreement(labels: pd.Series) -> float:
    n = len(labels)
    agreeing = sum(c * (c - 1) // 2 for c in Counter(labels).values())
    return agreeing / (n * (n - 1) // 2)


def _kappa(items: list[pd.DataFrame]) -> tuple[float, str]:
    if not items:
        return NAN, ""
    annotators = sorted({a for g in items for a in g["annotator_id"]})
    undefined = len({label for g in items for label in g["label"]}) < 2
    if len(annotators) == 2:
        if undefined:
            return NAN, "cohen"
        from sklearn.metrics import cohen_kappa_score

        first = [g.set_index("annotator_id").at[annotators[0], "label"] for g in items]
        second = [g.set_index("annotator_id").at[annotators[1], "label"] for g in items]
        return float(cohen_kappa_score(first, second)), "cohen"
    if undefined:
        return NAN, "fleiss"
    from statsmodels.stats.inter_rater import aggregate_raters, fleiss_kappa

    m = min(len(g) for g in items)
    table, _categories = aggregate_raters(np.array([list(g["label"].iloc[:m]) for g in items], dtype=object))
    return float(fleiss_kappa(table, method="fleiss")), "fleiss"


def _quality(
    ordered: pd.DataFrame, items: list[pd.DataFrame], answers: dict[str, str], gold: frozenset[str], recent: int
) -> list[AnnotatorQuality]:
    majority_hits: Counter[str] = Counter()
    majority_items: Counter[str] = Counter()
    for g in items:
        (top, count), *rest = Counter(g["label"]).most_common(2) + [(None, 0)]
        if rest[0][1] == count:
            continue
        for annotator, label in zip(g["annotator_id"], g["label"], strict=True):
            majority_items[annotator] += 1
            majority_hits[annotator] += label == top
    out = []
    for annotator, own in ordered.groupby("annotator_id", sort=True):
        anchored = own[own["item_id"].isin(answers.keys())] if annotator not in gold else own.iloc[:0]
        correct = [answers[i] == c for i, c in zip(anchored["item_id"], anchored["choice"], strict=True)]
        out.append(
            AnnotatorQuality(
                annotator_id=str(annotator),
                anchors=len(correct),
                anchor_accuracy=_share(correct),
                recent_anchor_accuracy=_share(correct[-recent:]),
                majority_agreement=majority_hits[annotator] / majority_items[annotator]
                if majority_items[annotator]
                else NAN,
            )
        )
    return out


def _share(flags: list[bool]) -> float:
    return sum(flags) / len(flags) if flags else NAN


def measure_store(root: Path | str, tenant: str, project: str = "", calibration_only: bool = False) -> Agreement:
    """`measure` over one tenant's judgements in a store, optionally one project's or
    calibration items only. Known answers come from that tenant's gold annotators (and the
    anchors file): another tenant's events never define them."""
    from tuneloop.store.read import load_judgements

    return _measure_tenant(load_judgements(root), read_anchors_file(root), tenant, project, calibration_only)


def measure_tenants(root: Path | str, tenants: Iterable[str] | None = None) -> dict[str, Agreement]:
    """`measure_store` for each of `tenants` (None: every tenant with judgements), from one read."""
    from tuneloop.store.read import load_judgements

    judgements, file = load_judgements(root), read_anchors_file(root)
    wanted = sorted(set(judgements["tenant"])) if tenants is None else list(tenants)
    return {tenant: _measure_tenant(judgements, file, tenant) for tenant in wanted}


def _measure_tenant(
    judgements: pd.DataFrame, file: KnownAnswers, tenant: str, project: str = "", calibration_only: bool = False
) -> Agreement:
    judgements = judgements[judgements["tenant"] == tenant]
    # Answers come from every judgement of the tenant: a gold label stays known when the view is narrowed.
    answers = known_answers(judgements, file)
    if project:
        judgements = judgements[judgements["project"] == project]
    if calibration_only:
        judgements = judgements[judgements["calibration"]]
    return measure(judgements, answers, file.gold)


def report(
    store_root: Path | str, tenant: str, project: str = "", calibration_only: bool = False
) -> feedback_pb2.AgreementReport:
    """The Feedback service's GetAgreement answer."""
    return measure_store(store_root, tenant, project, calibration_only).to_proto()
