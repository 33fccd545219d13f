"""What a FeedbackEvent names, read the same way by the Feedback service and the store."""

from __future__ import annotations

from tuneloop.v1 import feedback_pb2

# A rating that names no scale is on 1–5.
DEFAULT_SCALE = (1.0, 5.0)
# Separates the sorted completion ids of a default item id; "|" is not found in UUIDs or
# the service's own completion ids, so distinct sets give distinct item ids.
ITEM_ID_SEPARATOR = "|"


def judged_completion_ids(event: feedback_pb2.FeedbackEvent) -> list[str]:
    """The completion ids an event judges, in the order the event names them."""
    kind = event.WhichOneof("judgement")
    if kind == "pairwise":
        return [event.pairwise.completion_a_id, event.pairwise.completion_b_id]
    if kind == "rating":
        return [event.rating.completion_id]
    if kind == "ranking":
        return list(event.ranking.completion_ids)
    return []


def default_item_id(event: feedback_pb2.FeedbackEvent) -> str:
    """The item id of an event that names none: its sorted completion ids, joined.

    Sorted, so A/B shown in either order (or a ranking in any order) is the same item for
    every annotator; deterministic, so a resubmitted event gets the same id.
    """
    return ITEM_ID_SEPARATOR.join(sorted(judged_completion_ids(event)))
