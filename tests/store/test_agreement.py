"""Agreement and annotator quality on hand-computed cases, cross-checked against scikit-learn
and statsmodels called directly on the same labels."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import cohen_kappa_score
from statsmodels.stats.inter_rater import aggregate_raters, fleiss_kappa

from tuneloop.store.agreement import (
    KnownAnswers,
    item_label,
    known_answers,
    measure,
    normalise_answer,
    read_anchors_file,
)

START = pd.Timestamp("2026-01-01", tz="UTC")
_clock = itertools.count()


def judgement(
    item: str,
    annotator: str,
    choice: str,
    *,
    kind: str = "rating",
    ids: tuple[str, ...] = ("x", "y"),
    anchor: bool = False,
) -> dict:
    """A judgements-table row; each call is one second after the previous one."""
    return {
        "item_id": item,
        "annotator_id": annotator,
        "kind": kind,
        "choice": choice,
        "completion_ids": sorted(ids),
        "anchor": anchor,
        "calibration": False,
        "project": "",
        "created_at": START + pd.Timedelta(seconds=next(_clock)),
    }


def frame(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows)


# Fleiss (1971) via Wikipedia's worked example: 10 subjects, 14 raters, 5 categories; each row
# counts the raters who chose each category. P̄ = 0.378, P̄e = 0.213, κ = 0.210.
FLEISS_TABLE = [
    [0, 0, 0, 0, 14],
    [0, 2, 6, 4, 2],
    [0, 0, 3, 5, 6],
    [0, 3, 9, 2, 0],
    [2, 2, 8, 1, 1],
    [7, 7, 0, 0, 0],
    [3, 2, 6, 3, 0],
    [2, 5, 3, 2, 2],
    [6, 5, 2, 1, 0],
    [0, 2, 2, 3, 7],
]


def test_perfect_agreement_is_kappa_one() -> None:
    labels = ["first", "second", "tie", "first", "both_bad"]
    rows = [judgement(f"i{n}", a, label) for n, label in enumerate(labels) for a in ("ann-1", "ann-2")]
    result = measure(frame(rows))
    assert (result.items, result.judgements, result.annotator_count) == (5, 10, 2)
    assert result.kappa_method == "cohen"
    assert result.kappa == pytest.approx(1.0)
    assert result.percent_agreement == 1.0
    assert result.kappa == pytest.approx(cohen_kappa_score(labels, labels))


def test_cohen_kappa_textbook_case() -> None:
    # 50 items, two annotators: both up 20, up/down 5, down/up 10, both down 15.
    # p_o = 35/50 = 0.7; p_e = 0.5·0.6 + 0.5·0.4 = 0.5; κ = (0.7 − 0.5) / (1 − 0.5) = 0.4.
    pairs = [("up", "up")] * 20 + [("up", "down")] * 5 + [("down", "up")] * 10 + [("down", "down")] * 15
    rows = []
    for n, (first, second) in enumerate(pairs):
        rows += [judgement(f"i{n}", "ann-1", first), judgement(f"i{n}", "ann-2", second)]
    result = measure(frame(rows))
    assert result.kappa_method == "cohen"
    assert result.kappa == pytest.approx(0.4)
    assert result.percent_agreement == pytest.approx(0.7)
    assert result.kappa == pytest.approx(cohen_kappa_score([p[0] for p in pairs], [p[1] for p in pairs]))


def test_fleiss_kappa_textbook_case() -> None:
    rows = []
    for n, counts in enumerate(FLEISS_TABLE):
        raters = iter(f"ann-{r:02d}" for r in range(14))
        for category, count in enumerate(counts, start=1):
            rows += [judgement(f"s{n}", next(raters), str(category)) for _ in range(count)]
    result = measure(frame(rows))
    assert (result.items, result.judgements, result.annotator_count) == (10, 140, 14)
    assert result.kappa_method == "fleiss"
    assert result.kappa == pytest.approx(0.210, abs=5e-4)
    # Percent agreement is Fleiss' P̄: the mean share of agreeing rater pairs per subject.
    assert result.percent_agreement == pytest.approx(0.378, abs=5e-4)
    assert result.kappa == pytest.approx(fleiss_kappa(np.array(FLEISS_TABLE), method="fleiss"))


def test_percent_agreement_by_hand() -> None:
    rows = [
        # i1: 3 annotators, 1 of 3 pairs agree; i2: all agree; i3: one annotator, not counted.
        judgement("i1", "a", "up"),
        judgement("i1", "b", "up"),
        judgement("i1", "c", "down"),
        judgement("i2", "a", "down"),
        judgement("i2", "b", "down"),
        judgement("i2", "c", "down"),
        judgement("i3", "a", "up"),
    ]
    result = measure(frame(rows))
    assert (result.items, result.judgements) == (2, 6)
    assert result.percent_agreement == pytest.approx((1 / 3 + 1) / 2)
    table, _ = aggregate_raters(np.array([["up", "up", "down"], ["down", "down", "down"]], dtype=object))
    assert result.kappa == pytest.approx(fleiss_kappa(table, method="fleiss"))


def test_pairwise_labels_do_not_depend_on_display_order() -> None:
    # ann-1 saw (x, y) and chose A = x; ann-2 saw (y, x) and chose B = x: the same verdict.
    assert item_label("pairwise", "x", ["y", "x"]) == item_label("pairwise", "x", ["x", "y"]) == "first"
    assert item_label("pairwise", "y", ["x", "y"]) == "second"
    assert item_label("pairwise", "tie", ["x", "y"]) == "tie"
    assert item_label("ranking", "z>x>y", ["x", "y", "z"]) == "2>0>1"
    # Labels are comparable across items: "first" on one item is "first" on another.
    rows = [
        judgement("i1", "a", "x", kind="pairwise"),
        judgement("i1", "b", "x", kind="pairwise"),
        judgement("i2", "a", "q", kind="pairwise", ids=("p", "q")),
        judgement("i2", "b", "q", kind="pairwise", ids=("p", "q")),
    ]
    result = measure(frame(rows))
    assert result.kappa == pytest.approx(cohen_kappa_score(["first", "second"], ["first", "second"]))


def test_an_annotators_latest_judgement_of_an_item_counts() -> None:
    rows = [judgement("i1", "a", "up"), judgement("i1", "b", "down"), judgement("i1", "b", "up")]
    result = measure(frame(rows))
    assert (result.items, result.judgements, result.percent_agreement) == (1, 2, 1.0)


def test_fleiss_with_uneven_raters_keeps_the_earliest_m() -> None:
    rows = [
        judgement("i1", "a", "1"),
        judgement("i1", "b", "1"),
        judgement("i1", "c", "2"),
        judgement("i2", "a", "2"),
        judgement("i2", "c", "2"),
        judgement("i2", "b", "1"),
        judgement("i2", "d", "1"),
        judgement("i3", "b", "1"),
        judgement("i3", "d", "2"),
        judgement("i3", "a", "2"),
    ]
    result = measure(frame(rows))
    table, _ = aggregate_raters(np.array([["1", "1", "2"], ["2", "2", "1"], ["1", "2", "2"]], dtype=object))
    assert result.kappa_method == "fleiss"
    assert result.kappa == pytest.approx(fleiss_kappa(table, method="fleiss"))


def test_kappa_is_undefined_when_every_label_is_the_same() -> None:
    rows = [judgement(f"i{n}", a, "up") for n in range(3) for a in ("a", "b")]
    result = measure(frame(rows))
    assert result.percent_agreement == 1.0 and math.isnan(result.kappa) and result.kappa_method == "cohen"
    empty = measure(frame([judgement("i1", "a", "up")]))
    assert empty.items == 0 and math.isnan(empty.kappa) and empty.kappa_method == ""


def test_majority_agreement() -> None:
    rows = [
        judgement("i1", "a", "up"),
        judgement("i1", "b", "up"),
        judgement("i1", "c", "down"),
        judgement("i2", "a", "1"),
        judgement("i2", "b", "2"),
        judgement("i2", "c", "3"),  # no plurality
        judgement("i3", "a", "up"),
        judgement("i3", "b", "up"),
        judgement("i3", "c", "up"),
    ]
    quality = {q.annotator_id: q for q in measure(frame(rows)).annotators}
    assert quality["a"].majority_agreement == 1.0
    assert quality["c"].majority_agreement == pytest.approx(0.5)


def test_anchor_accuracy_shows_drift_in_the_recent_window() -> None:
    answers = {f"anchor-{n}": "up" for n in range(40)}
    rows = []
    for n in range(40):
        rows.append(judgement(f"anchor-{n}", "steady", "up"))
        # `drifter` is right on the first 20 anchors and wrong on the last 20.
        rows.append(judgement(f"anchor-{n}", "drifter", "up" if n < 20 else "down"))
    rows.append(judgement("not-an-anchor", "drifter", "down"))
    quality = {q.annotator_id: q for q in measure(frame(rows), answers, recent=20).annotators}
    assert (quality["steady"].anchors, quality["steady"].anchor_accuracy, quality["steady"].recent_anchor_accuracy) == (
        40,
        1.0,
        1.0,
    )
    drifter = quality["drifter"]
    assert (drifter.anchors, drifter.anchor_accuracy, drifter.recent_anchor_accuracy) == (40, 0.5, 0.0)
    assert drifter.recent_anchor_accuracy < drifter.anchor_accuracy


def test_known_answers_from_gold_annotators_and_the_file(tmp_path: Path) -> None:
    rows = [
        judgement("i1", "lead", "x", kind="pairwise", anchor=True),
        judgement("i2", "lead", "y", kind="pairwise", anchor=True),
        judgement("i2", "lead", "x", kind="pairwise", anchor=True),  # the lead's latest answer wins
        judgement("i3", "lead", "x", kind="pairwise"),  # not flagged anchor: not an answer
        judgement("i4", "ann", "y", kind="pairwise", anchor=True),  # not a gold annotator
        judgement("i1", "ann", "x", kind="pairwise"),
        judgement("i2", "ann", "y", kind="pairwise"),
        judgement("i5", "ann", "4", kind="rating"),
    ]
    (tmp_path / "anchors.json").write_text(json.dumps({"answers": {"i2": "y", "i5": 4}, "gold_annotators": ["lead"]}))
    file = read_anchors_file(tmp_path)
    assert file == KnownAnswers({"i2": "y", "i5": "4"}, frozenset({"lead"}))
    answers = known_answers(frame(rows), file)
    assert answers == {"i1": "x", "i2": "y", "i5": "4"}  # the file overrides the lead on i2
    quality = {q.annotator_id: q for q in measure(frame(rows), answers, file.gold).annotators}
    assert (quality["ann"].anchors, quality["ann"].anchor_accuracy) == (3, 1.0)
    assert quality["lead"].anchors == 0 and math.isnan(quality["lead"].anchor_accuracy)

    (tmp_path / "anchors.json").write_text(json.dumps({"i9": ["b", "a"]}))
    assert read_anchors_file(tmp_path) == KnownAnswers({"i9": "b>a"}, frozenset())
    assert read_anchors_file(tmp_path / "missing") == KnownAnswers({}, frozenset())
    assert [normalise_answer(v) for v in (True, False, 4.5, 3, "tie")] == ["up", "down", "4.5", "3", "tie"]
