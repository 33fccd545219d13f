"""Translation between the gateway's JSON and the v1 protobuf contracts."""

from __future__ import annotations

import time
from datetime import datetime, timezone

from google.protobuf.timestamp_pb2 import Timestamp

from tuneloop.gateway.auth import ApiKey
from tuneloop.gateway.schemas import ChatMessageIn, PairwiseIn, RankingIn, RatingIn, SamplingIn, ThumbsIn
from tuneloop.v1 import completion_pb2 as cpb
from tuneloop.v1 import feedback_pb2 as fpb

FINISH = {cpb.FINISH_REASON_STOP: "stop", cpb.FINISH_REASON_LENGTH: "length", cpb.FINISH_REASON_ABORTED: "stop"}
CHOICES = {
    "a": fpb.PAIRWISE_CHOICE_A,
    "b": fpb.PAIRWISE_CHOICE_B,
    "tie": fpb.PAIRWISE_CHOICE_TIE,
    "both_bad": fpb.PAIRWISE_CHOICE_BOTH_BAD,
}
# Field paths of the Feedback service's errors, as the JSON body spells them.
PROTO_TO_JSON_FIELD = {
    "pairwise.completion_a_id": "completion_ids[0]",
    "pairwise.completion_b_id": "completion_ids[1]",
    "pairwise.choice": "choice",
    "rating.completion_id": "completion_id",
    "rating.score": "score",
    "rating.scale_min": "scale_min",
    "rating.scale_max": "scale_max",
    "ranking.completion_ids": "completion_ids",
    "annotator_id": "user",
}


def prompt_of(messages: list[ChatMessageIn]) -> cpb.Prompt:
    # "developer" is OpenAI's newer name for the system role.
    turns = [cpb.ChatMessage(role="system" if m.role == "developer" else m.role, content=m.text()) for m in messages]
    return cpb.Prompt(chat=cpb.Conversation(messages=turns))


def sampling_of(req: SamplingIn, n: int = 1, logprobs: bool = False) -> cpb.SamplingParams:
    s = cpb.SamplingParams(n=n, logprobs=logprobs, stop=req.stops())
    if req.temperature is not None:
        s.temperature = req.temperature
    if req.top_p is not None:
        s.top_p = req.top_p
    max_tokens = req.max_completion_tokens or req.max_tokens
    if max_tokens is not None:
        s.max_tokens = max_tokens
    if req.seed is not None:
        s.seed = req.seed
    return s


def model_ref(model: str) -> str:
    """'policy@production' and 'production' both mean the alias; the policy is implied."""
    return model.split("@", 1)[1] if model.startswith("policy@") else model


def model_name(m: cpb.ModelVersion) -> str:
    return f"{m.name}@{m.version}"


def chat_completion_json(resp, created: int) -> dict:
    choices = []
    for c in resp.completions:
        choice = {
            "index": c.index,
            "message": {"role": "assistant", "content": c.text},
            "finish_reason": FINISH.get(c.finish_reason, "stop"),
            "logprobs": None,
            "completion_id": c.completion_id,
        }
        if c.logprobs:
            choice["logprobs"] = {
                "content": [
                    {"token": t.token, "logprob": t.logprob, "bytes": list(t.token.encode()), "top_logprobs": []}
                    for t in c.logprobs
                ]
            }
        choices.append(choice)
    completion_tokens = sum(c.completion_tokens for c in resp.completions)
    return {
        # The id feedback refers to: the first candidate's completion id (each choice carries its own).
        "id": resp.completions[0].completion_id if resp.completions else resp.request_id,
        "object": "chat.completion",
        "created": created,
        "model": model_name(resp.model),
        "choices": choices,
        "usage": {
            "prompt_tokens": resp.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": resp.prompt_tokens + completion_tokens,
        },
    }


def chunk_json(chunk, created: int) -> dict:
    finish = FINISH.get(chunk.finish_reason) if chunk.finish_reason else None
    return {
        "id": chunk.completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model_name(chunk.model),
        "choices": [
            {
                "index": chunk.index,
                "delta": {"role": "assistant", "content": chunk.delta} if chunk.delta or not finish else {},
                "finish_reason": finish,
                "completion_id": chunk.completion_id,
            }
        ],
    }


def _timestamp(dt: datetime | None) -> Timestamp:
    ts = Timestamp()
    if dt is None:
        ts.FromNanoseconds(time.time_ns())
    else:
        ts.FromDatetime(dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc))
    return ts


END_USER_PREFIX = "end-user:"


def identity_refusal(item: ThumbsIn | RatingIn | PairwiseIn | RankingIn, key: ApiKey) -> tuple[str, str] | None:
    """(field, reason) when the body claims an identity the key does not give.

    Who judged comes from the key: an annotator key judges as itself; a lead key may record
    judgements of its tenant's annotators by name (imports, adjudication); an app key's
    events are its end users'. Only annotator and lead keys mark calibration or anchor items,
    whose judgements define the known answers and the agreement figures.
    """
    if "lead" in key.roles:
        return None
    if "annotator" in key.roles:
        if item.user is not None and item.user != key.name:
            return "user", f"an annotator key judges as itself ({key.name}); omit user"
        return None
    for name in ("calibration", "anchor"):
        if getattr(item, name):
            return name, "only annotator and lead keys mark calibration or anchor items"
    return None


def feedback_event(item: ThumbsIn | RatingIn | PairwiseIn | RankingIn, key: ApiKey) -> fpb.FeedbackEvent:
    if key.roles & {"annotator", "lead"}:
        source, judge = fpb.FEEDBACK_SOURCE_ANNOTATOR, item.user or key.name
    else:
        # An app's end users never share a name with the tenant's annotators.
        source, judge = fpb.FEEDBACK_SOURCE_END_USER, END_USER_PREFIX + (item.user or key.name)
    ev = fpb.FeedbackEvent(
        event_id=item.event_id,
        created_at=_timestamp(item.created_at),
        tenant=key.tenant,
        source=source,
        annotator_id=judge,
        project=item.project,
        criteria=item.criteria,
        comment=item.comment,
        calibration=item.calibration,
        anchor=item.anchor,
        item_id=item.item_id,
    )
    if isinstance(item, ThumbsIn):
        ev.rating.completion_id = item.completion_id
        ev.rating.thumbs_up = item.thumbs_up
    elif isinstance(item, RatingIn):
        ev.rating.completion_id = item.completion_id
        ev.rating.score = item.score
        ev.rating.scale_min = item.scale_min
        ev.rating.scale_max = item.scale_max
    elif isinstance(item, PairwiseIn):
        ev.pairwise.completion_a_id, ev.pairwise.completion_b_id = item.completion_ids
        ev.pairwise.choice = CHOICES[item.choice]
    else:
        ev.ranking.completion_ids.extend(item.completion_ids)
    return ev


def completion_ids_of(item: ThumbsIn | RatingIn | PairwiseIn | RankingIn) -> list[str]:
    return [item.completion_id] if isinstance(item, (ThumbsIn, RatingIn)) else list(item.completion_ids)
