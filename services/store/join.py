"""From Kafka records to table rows: parse and check a record, join feedback with the
completions it judges, and make the judgement and the training pairs (pairs.py) of it.

Pure functions of their inputs: the consumer (consumer.py) decides what is looked up where.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC

from google.protobuf.message import DecodeError

from tuneloop.common.feedback_event import DEFAULT_SCALE, default_item_id, judged_completion_ids
from tuneloop.store.pairs import Pair, PairRules, Rating, pairwise_pairs, ranking_pairs, rating_pairs
from tuneloop.v1 import completion_pb2, feedback_pb2


LENGTH = "length"
# The Generation service's names (engines/base.py); unspecified is left unknown.
_FINISH = {
    completion_pb2.FINISH_REASON_STOP: "stop",
    completion_pb2.FINISH_REASON_LENGTH: LENGTH,
    completion_pb2.FINISH_REASON_ABORTED: "aborted",
}


class Unusable(Exception):
    """A record that cannot become rows: dead-lettered with `field` and `reason`."""

    def __init__(self, category: str, field: str, reason: str) -> None:
        super().__init__(reason)
        self.category, self.field, self.reason = category, field, reason


@dataclass(frozen=True)
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


@dataclass(frozen=True)
class Completion:
    completion_id: str
    request_id: str
    conversation_id: str
    tenant: str
    prompt: bytes
    rendered_prompt: str
    text: str
    model: str
    # "stop", "length" or "aborted"; None when the record did not say (and in rows stored
    # before the store kept it).
    finish_reason: str | None = None

    @property
    def cut(self) -> bool | None:
        """Whether the answer ended at the token limit (None: unknown)."""
        return None if self.finish_reason is None else self.finish_reason == LENGTH

    @property
    def prompt_key(self) -> str:
        return hashlib.sha256(self.prompt).hexdigest()

    def to_row(self, record: Record) -> dict:
        """Its row of the completions table, with the record it came from."""
        return {
            "completion_id": self.completion_id,
            "request_id": self.request_id,
            "conversation_id": self.conversation_id,
            "tenant": self.tenant,
            "prompt": self.prompt,
            "prompt_key": self.prompt_key,
            "rendered_prompt": self.rendered_prompt,
            "text": self.text,
            "model": self.model,
            "finish_reason": self.finish_reason,
            "topic": record.topic,
            "partition": record.partition,
            "offset": record.offset,
        }

    @classmethod
    def from_row(cls, row: Mapping) -> Completion:
        # .get: rows of a table version from before a column was added lack it.
        return cls(**{name: row.get(name) for name in cls.__dataclass_fields__})

    def prompt_parts(self) -> tuple[list[dict[str, str]], str]:
        """(chat messages, raw text): one of the two is empty."""
        prompt = completion_pb2.Prompt.FromString(self.prompt)
        if prompt.WhichOneof("input") == "chat":
            return [{"role": m.role, "content": m.content} for m in prompt.chat.messages], ""
        return [], prompt.raw


def parse_completion(value: bytes | None) -> Completion:
    try:
        rec = completion_pb2.CompletionRecord.FromString(value or b"")
    except DecodeError as err:
        raise Unusable("unparseable", "", f"not a CompletionRecord: {err}") from None
    completion_id = rec.completion_id or rec.completion.completion_id
    if not completion_id:
        raise Unusable("invalid", "completion_id", "required")
    return Completion(
        completion_id=completion_id,
        request_id=rec.request_id,
        conversation_id=rec.conversation_id,
        tenant=rec.tenant,
        # Deterministic bytes: equal prompts compare equal as bytes (and as prompt keys).
        prompt=rec.prompt.SerializeToString(deterministic=True),
        rendered_prompt=rec.rendered_prompt,
        text=rec.completion.text,
        model=f"{rec.model.name}@{rec.model.version}" if rec.model.name else "",
        finish_reason=_FINISH.get(rec.completion.finish_reason),
    )


def parse_feedback(value: bytes | None) -> feedback_pb2.FeedbackEvent:
    """Parse and check what the store relies on (the Feedback service checked more)."""
    try:
        event = feedback_pb2.FeedbackEvent.FromString(value or b"")
    except DecodeError as err:
        raise Unusable("unparseable", "", f"not a FeedbackEvent: {err}") from None
    for name in ("event_id", "annotator_id"):
        if not getattr(event, name):
            raise Unusable("invalid", name, "required")
    kind = event.WhichOneof("judgement")
    if kind is None:
        raise Unusable("invalid", "judgement", "required: one of pairwise, rating, ranking")
    ids = judged_completion_ids(event)
    for i, completion_id in enumerate(ids):
        if not completion_id:
            raise Unusable("invalid", id_field(event, i), "required")
    if len(set(ids)) != len(ids):
        raise Unusable("invalid", id_field(event, len(ids) - 1), "a completion is named twice")
    if kind == "pairwise" and event.pairwise.choice not in (1, 2, 3, 4):
        raise Unusable("invalid", "pairwise.choice", f"unknown or unspecified choice {event.pairwise.choice}")
    if kind == "ranking" and len(ids) < 2:
        raise Unusable("invalid", "ranking.completion_ids", f"needs at least 2 completions, got {len(ids)}")
    if kind == "rating" and event.rating.WhichOneof("value") is None:
        raise Unusable("invalid", "rating.value", "required: a score or thumbs_up")
    return event


def id_field(event: feedback_pb2.FeedbackEvent, index: int) -> str:
    kind = event.WhichOneof("judgement")
    if kind == "pairwise":
        return ("pairwise.completion_a_id", "pairwise.completion_b_id")[index]
    if kind == "rating":
        return "rating.completion_id"
    return f"ranking.completion_ids[{index}]"


def check_join(event: feedback_pb2.FeedbackEvent, found: Sequence[Completion]) -> None:
    """What only the join can tell: the completions are the tenant's and judge one prompt."""
    for completion in found:
        if completion.tenant != event.tenant:
            raise Unusable(
                "tenant_mismatch",
                "tenant",
                f"feedback of tenant {event.tenant!r} judges completion {completion.completion_id} "
                f"of tenant {completion.tenant!r}",
            )
    for i, completion in enumerate(found[1:], start=1):
        if completion.prompt != found[0].prompt:
            raise Unusable(
                "different_prompts",
                id_field(event, i),
                f"completions {found[0].completion_id} and {completion.completion_id} answer different prompts",
            )


_SOURCES = {feedback_pb2.FEEDBACK_SOURCE_END_USER: "end_user", feedback_pb2.FEEDBACK_SOURCE_ANNOTATOR: "annotator"}
_CHOICES = {feedback_pb2.PAIRWISE_CHOICE_TIE: "tie", feedback_pb2.PAIRWISE_CHOICE_BOTH_BAD: "both_bad"}


def _scale(rating: feedback_pb2.RatingJudgement) -> tuple[float, float]:
    if rating.scale_min == 0 and rating.scale_max == 0:
        return DEFAULT_SCALE
    return rating.scale_min, rating.scale_max


def rating_of(event: feedback_pb2.FeedbackEvent, completion: Completion) -> Rating:
    r = event.rating
    thumb = r.WhichOneof("value") == "thumbs_up"
    low, high = _scale(r)
    return Rating(
        event_id=event.event_id,
        completion_id=r.completion_id,
        tenant=event.tenant,
        annotator_id=event.annotator_id,
        request_id=completion.request_id,
        prompt_key=completion.prompt_key,
        kind="thumb" if thumb else "score",
        value=(1.0 if r.thumbs_up else 0.0) if thumb else float(r.score),
        scale_min=low,
        scale_max=high,
    )


def choice_of(event: feedback_pb2.FeedbackEvent) -> tuple[str, float | None]:
    """The verdict in absolute terms (a completion id, not a display position), and a score.

    Pairwise: the preferred completion id, or "tie" / "both_bad". Rating: the score as text
    ("%g") or "up" / "down". Ranking: completion ids best first joined by ">".
    """
    kind = event.WhichOneof("judgement")
    if kind == "pairwise":
        p = event.pairwise
        winner = {feedback_pb2.PAIRWISE_CHOICE_A: p.completion_a_id, feedback_pb2.PAIRWISE_CHOICE_B: p.completion_b_id}
        return winner.get(p.choice) or _CHOICES[p.choice], None
    if kind == "rating":
        if event.rating.WhichOneof("value") == "thumbs_up":
            return ("up" if event.rating.thumbs_up else "down"), None
        return f"{event.rating.score:g}", float(event.rating.score)
    return ">".join(event.ranking.completion_ids), None


@dataclass
class Joined:
    rows: list[dict]
    judgement: dict
    rating: Rating | None


def join(
    event: feedback_pb2.FeedbackEvent,
    record: Record,
    completions: Mapping[str, Completion],
    earlier_ratings: Callable[[Rating], Iterable[Rating]],
    lookup: Callable[[Iterable[str]], Mapping[str, Completion]],
    rules: PairRules,
    weight: float,
) -> Joined:
    """Rows and the judgement of an event whose completions are all in `completions`."""
    ids = judged_completion_ids(event)
    found = [completions[i] for i in ids]
    check_join(event, found)
    kind = event.WhichOneof("judgement")
    rating = None
    if kind == "pairwise":
        pairs = pairwise_pairs(event.pairwise.choice, *ids)
    elif kind == "ranking":
        pairs = ranking_pairs(ids, rules)
    else:
        rating = rating_of(event, found[0])
        pairs = rating_pairs(rating, earlier_ratings(rating), rules)
    known = {**completions, **lookup({i for p in pairs for i in (p.chosen_id, p.rejected_id)} - set(completions))}
    created_at = event.created_at.ToDatetime(tzinfo=UTC)
    item_id = event.item_id or default_item_id(event)
    source = _SOURCES.get(event.source, "unspecified")
    base = {
        "event_id": event.event_id,
        "item_id": item_id,
        "tenant": event.tenant,
        "project": event.project,
        "source": source,
        "annotator_id": event.annotator_id,
        "criteria": list(event.criteria),
        "calibration": event.calibration,
        "anchor": event.anchor,
        "created_at": created_at,
        "topic": record.topic,
        "partition": record.partition,
        "offset": record.offset,
    }
    kind_label = "thumbs" if rating is not None and rating.kind == "thumb" else kind
    rows = [_row(base, pair, known, kind_label, weight, n) for n, pair in enumerate(pairs)]
    choice, score = choice_of(event)
    judgement = {
        **base,
        "kind": kind_label,
        "choice": choice,
        "score": score,
        "completion_ids": sorted(ids),
        "marks": json.dumps(
            [{"criterion": m.criterion, "completion_id": m.completion_id, "value": m.value} for m in event.marks]
        ),
        "comment": event.comment,
        "request_id": found[0].request_id,
        "prompt_key": found[0].prompt_key,
        "value": rating.value if rating else None,
        "scale_min": rating.scale_min if rating else None,
        "scale_max": rating.scale_max if rating else None,
    }
    return Joined(rows, judgement, rating)


def rating_from_judgement(row: Mapping) -> Rating:
    """The Rating a stored rating judgement was made of (its first completion is the rated one)."""
    return Rating(
        event_id=row["event_id"],
        completion_id=row["completion_ids"][0],
        tenant=row["tenant"],
        annotator_id=row["annotator_id"],
        request_id=row["request_id"],
        prompt_key=row["prompt_key"],
        kind="thumb" if row["kind"] == "thumbs" else "score",
        value=row["value"],
        scale_min=row["scale_min"],
        scale_max=row["scale_max"],
    )


def _row(base: dict, pair: Pair, known: Mapping[str, Completion], kind: str, weight: float, n: int) -> dict:
    chosen, rejected = known[pair.chosen_id], known[pair.rejected_id]
    messages, raw = chosen.prompt_parts()
    sources = [pair.other_event_id, base["event_id"]] if pair.other_event_id else [base["event_id"]]
    return {
        **base,
        "row_id": f"{base['event_id']}#{n}",
        "source_event_ids": sources,
        "kind": kind,
        "rule": pair.rule,
        "label": pair.label,
        "prompt": messages,
        "prompt_raw": raw,
        "rendered_prompt": chosen.rendered_prompt,
        "chosen": chosen.text,
        "rejected": rejected.text,
        "chosen_id": chosen.completion_id,
        "rejected_id": rejected.completion_id,
        "chosen_model": chosen.model,
        "rejected_model": rejected.model,
        "weight": weight,
        "chosen_cut": chosen.cut,
        "rejected_cut": rejected.cut,
    }
