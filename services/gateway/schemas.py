"""The gateway's HTTP request bodies (OpenAI-compatible where OpenAI defines them)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_TEXT = 32_768
Id = Annotated[str, Field(min_length=1, max_length=128)]


class TextPart(BaseModel):
    type: Literal["text"]
    text: str = Field(max_length=MAX_TEXT)


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer"]
    # OpenAI clients send either a string or a list of content parts; text parts only here.
    content: Union[str, list[TextPart]] = Field(max_length=MAX_TEXT)

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class SamplingIn(BaseModel):
    model_config = ConfigDict(extra="ignore")
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1, le=4096)
    max_completion_tokens: int | None = Field(None, ge=1, le=4096)
    stop: Union[str, list[Annotated[str, Field(min_length=1, max_length=256)]], None] = Field(None, max_length=4)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)

    @field_validator("stop")
    @classmethod
    def _non_empty(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, str) and not (1 <= len(v) <= 256):
            raise ValueError("a stop string must have 1 to 256 characters")
        return v

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class ChatCompletionRequest(SamplingIn):
    model: str = Field("production", max_length=128, description="Registry alias or version of the policy.")
    messages: list[ChatMessageIn] = Field(min_length=1, max_length=256)
    n: int = Field(1, ge=1, le=8)
    stream: bool = False
    logprobs: bool = False
    user: str | None = Field(None, max_length=128, description="The app's end-user id.")


class ComparisonRequest(SamplingIn):
    """Two candidates for one prompt: two samples of `model`, or one each of two versions."""

    messages: list[ChatMessageIn] = Field(min_length=1, max_length=256)
    model: str = Field("production", max_length=128, description="Version answering as A (and B if model_b is unset).")
    model_b: str | None = Field(None, max_length=128, description="Version answering as B, e.g. 'candidate'.")
    user: str | None = Field(None, max_length=128)


class _FeedbackBase(BaseModel):
    model_config = ConfigDict(extra="forbid")
    event_id: Id = Field(default_factory=lambda: uuid.uuid4().hex)
    created_at: datetime | None = Field(None, description="When the judgement was made (default: now).")
    user: Id | None = Field(
        None,
        description="An app key: its end user's id (recorded as an end user of the key's tenant). A lead key: "
        "the annotator whose judgement this is. An annotator key judges as itself: omit it or give the key's name. "
        "Default: the API key's name.",
    )
    project: str = Field("", max_length=128)
    criteria: list[Annotated[str, Field(min_length=1, max_length=64)]] = Field(default_factory=list, max_length=16)
    comment: str = Field("", max_length=4096)
    calibration: bool = False
    anchor: bool = False
    item_id: str = Field("", max_length=256)


class ThumbsIn(_FeedbackBase):
    type: Literal["thumbs"]
    completion_id: Id
    thumbs_up: bool


class RatingIn(_FeedbackBase):
    type: Literal["rating"]
    completion_id: Id
    score: float
    scale_min: float = 1
    scale_max: float = 5


class PairwiseIn(_FeedbackBase):
    type: Literal["pairwise"]
    completion_ids: list[Id] = Field(min_length=2, max_length=2, description="[A, B]")
    choice: Literal["a", "b", "tie", "both_bad"]


class RankingIn(_FeedbackBase):
    type: Literal["ranking"]
    completion_ids: list[Id] = Field(min_length=2, max_length=16, description="Best first.")


FeedbackIn = Annotated[Union[ThumbsIn, RatingIn, PairwiseIn, RankingIn], Field(discriminator="type")]


class FeedbackBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    events: list[FeedbackIn] = Field(min_length=1)
