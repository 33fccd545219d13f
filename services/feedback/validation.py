"""Checks on a FeedbackEvent before it may enter Kafka, each failure naming the field path
(e.g. "pairwise.choice", "marks[2].criterion") so a sender can fix exactly that field.

Everything the contract asks is checked here, at the door, where the sender can still be
told: ids present and bounded, a plausible created_at, one judgement of a known kind that is
internally consistent, criteria and marks that agree, the bounds of free-form parts. The
preference store checks again the little it cannot work without (store/join.py
`parse_feedback`), because anything with write access to the topic may produce to it, and
dead-letters what fails; the trainer reads the store's tables, never the topic.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from tuneloop.common.errors import FieldError
from tuneloop.common.feedback_event import DEFAULT_SCALE, default_item_id, judged_completion_ids
from tuneloop.v1 import feedback_pb2

# Fixed by the FeedbackEvent contract, not a deployment choice.
MAX_EVENT_ID_CHARS = 128

_KNOWN_SOURCES = frozenset(feedback_pb2.FeedbackSource.values()) - {feedback_pb2.FEEDBACK_SOURCE_UNSPECIFIED}
_KNOWN_CHOICES = frozenset(feedback_pb2.PairwiseChoice.values()) - {feedback_pb2.PAIRWISE_CHOICE_UNSPECIFIED}
_INDEX = re.compile(r"\[\d+\]")


@dataclass(frozen=True)
class Limits:
    """The deployment's bounds (see FeedbackSettings)."""

    max_clock_skew_s: float = 300.0
    max_id_chars: int = 256
    max_comment_chars: int = 4096
    max_criteria: int = 32
    max_marks: int = 128
    max_ranked: int = 64


DEFAULT_LIMITS = Limits()


def field_label(field: str) -> str:
    """A field path without list indexes ("marks[3].criterion" -> "marks[].criterion"):
    a small fixed set of values, fit for a metric label."""
    return _INDEX.sub("[]", field)


def fill_item_id(event: feedback_pb2.FeedbackEvent) -> None:
    """Set the default item id on a valid event that names none (in place)."""
    if not event.item_id:
        event.item_id = default_item_id(event)


def validate(event: feedback_pb2.FeedbackEvent, now: float, limits: Limits = DEFAULT_LIMITS) -> None:
    """Raise FieldError for the first problem found; `now` is Unix time in seconds."""
    _required_id(event.event_id, "event_id", MAX_EVENT_ID_CHARS)
    _created_at(event, now, limits)
    if event.source not in _KNOWN_SOURCES:
        raise FieldError("source", "unspecified" if event.source == 0 else f"unknown value {event.source}")
    _required_id(event.annotator_id, "annotator_id", limits.max_id_chars)
    _optional_id(event.tenant, "tenant", limits)
    _optional_id(event.project, "project", limits)
    _optional_id(event.item_id, "item_id", limits)

    kind = event.WhichOneof("judgement")
    if kind is None:
        raise FieldError("judgement", "required: one of pairwise, rating, ranking")
    if kind == "pairwise":
        _pairwise(event.pairwise, limits)
    elif kind == "rating":
        _rating(event.rating, limits)
    else:
        _ranking(event.ranking, limits)

    _criteria_and_marks(event, limits)
    if len(event.comment) > limits.max_comment_chars:
        raise FieldError("comment", f"longer than {limits.max_comment_chars} characters")


def _required_id(value: str, field: str, max_chars: int) -> None:
    if not value.strip():
        raise FieldError(field, "required")
    if len(value) > max_chars:
        raise FieldError(field, f"longer than {max_chars} characters")


def _optional_id(value: str, field: str, limits: Limits) -> None:
    if len(value) > limits.max_id_chars:
        raise FieldError(field, f"longer than {limits.max_id_chars} characters")


def _created_at(event: feedback_pb2.FeedbackEvent, now: float, limits: Limits) -> None:
    # An all-zero Timestamp is what a sender that forgot to set it usually sends.
    ts = event.created_at
    if not event.HasField("created_at") or (ts.seconds == 0 and ts.nanos == 0):
        raise FieldError("created_at", "required")
    if ts.seconds < 0 or not 0 <= ts.nanos < 1_000_000_000:
        raise FieldError("created_at", "not a valid timestamp")
    ahead = ts.seconds + ts.nanos / 1e9 - now
    if ahead > limits.max_clock_skew_s:
        raise FieldError("created_at", f"{ahead:.0f} s in the future (tolerated skew {limits.max_clock_skew_s:.0f} s)")


def _pairwise(judgement: feedback_pb2.PairwiseJudgement, limits: Limits) -> None:
    _required_id(judgement.completion_a_id, "pairwise.completion_a_id", limits.max_id_chars)
    _required_id(judgement.completion_b_id, "pairwise.completion_b_id", limits.max_id_chars)
    if judgement.completion_a_id == judgement.completion_b_id:
        raise FieldError("pairwise.completion_b_id", "same completion as completion_a_id")
    if judgement.choice not in _KNOWN_CHOICES:
        reason = "unspecified" if judgement.choice == 0 else f"unknown value {judgement.choice}"
        raise FieldError("pairwise.choice", reason)


def _rating(judgement: feedback_pb2.RatingJudgement, limits: Limits) -> None:
    _required_id(judgement.completion_id, "rating.completion_id", limits.max_id_chars)
    low, high = judgement.scale_min, judgement.scale_max
    if low == 0 and high == 0:
        low, high = DEFAULT_SCALE
    if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
        raise FieldError("rating.scale_max", f"scale [{low:g}, {high:g}] is empty: scale_max must exceed scale_min")
    value = judgement.WhichOneof("value")
    if value is None:
        raise FieldError("rating.value", "required: a score or thumbs_up")
    if value == "score" and not (math.isfinite(judgement.score) and low <= judgement.score <= high):
        raise FieldError("rating.score", f"{judgement.score:g} is outside the scale [{low:g}, {high:g}]")


def _ranking(judgement: feedback_pb2.RankingJudgement, limits: Limits) -> None:
    ids = judgement.completion_ids
    if len(ids) < 2:
        raise FieldError("ranking.completion_ids", f"needs at least 2 completions, got {len(ids)}")
    if len(ids) > limits.max_ranked:
        raise FieldError("ranking.completion_ids", f"more than {limits.max_ranked} completions")
    seen: set[str] = set()
    for i, completion_id in enumerate(ids):
        _required_id(completion_id, f"ranking.completion_ids[{i}]", limits.max_id_chars)
        if completion_id in seen:
            raise FieldError("ranking.completion_ids", f"not a permutation: {completion_id!r} appears twice")
        seen.add(completion_id)


def _criteria_and_marks(event: feedback_pb2.FeedbackEvent, limits: Limits) -> None:
    if len(event.criteria) > limits.max_criteria:
        raise FieldError("criteria", f"more than {limits.max_criteria} criteria")
    criteria: set[str] = set()
    for i, name in enumerate(event.criteria):
        _required_id(name, f"criteria[{i}]", limits.max_id_chars)
        if name in criteria:
            raise FieldError(f"criteria[{i}]", f"{name!r} named twice")
        criteria.add(name)

    if len(event.marks) > limits.max_marks:
        raise FieldError("marks", f"more than {limits.max_marks} marks")
    judged = set(judged_completion_ids(event))
    for i, mark in enumerate(event.marks):
        if mark.criterion not in criteria:
            raise FieldError(f"marks[{i}].criterion", f"{mark.criterion!r} is not among the event's criteria")
        if mark.completion_id and mark.completion_id not in judged:
            raise FieldError(f"marks[{i}].completion_id", f"{mark.completion_id!r} is not judged by this event")
        if not math.isfinite(mark.value):
            raise FieldError(f"marks[{i}].value", "not a finite number")
