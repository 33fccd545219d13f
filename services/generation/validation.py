"""Request checks: each violation is a FieldError naming the field, so the client gets
INVALID_ARGUMENT with e.g. `sampling.temperature` and the accepted range."""

from __future__ import annotations

import math

from tuneloop.common.errors import FieldError
from tuneloop.generation.engines.base import Sampling
from tuneloop.generation.settings import GenerationSettings
from tuneloop.v1 import completion_pb2, generation_pb2

ROLES = ("system", "user", "assistant")
MAX_STOP = 4
MAX_STOP_CHARS = 256
MAX_N = 8
MAX_ID_CHARS = 256
# Candidate i samples with seed + i, and torch seeds are signed 64-bit.
MAX_SEED = (1 << 63) - 1 - MAX_N


def check_ids(request: generation_pb2.GenerateRequest) -> None:
    for name in ("request_id", "conversation_id", "tenant"):
        if len(getattr(request, name)) > MAX_ID_CHARS:
            raise FieldError(name, f"at most {MAX_ID_CHARS} characters")


def check_prompt(prompt: completion_pb2.Prompt, has_prompt: bool) -> None:
    kind = prompt.WhichOneof("input") if has_prompt else None
    if kind is None:
        raise FieldError("prompt", "required: set prompt.chat or prompt.raw")
    if kind == "raw":
        if not prompt.raw:
            raise FieldError("prompt.raw", "must not be empty")
        return
    messages = prompt.chat.messages
    if not messages:
        raise FieldError("prompt.chat.messages", "at least one message is required")
    for i, message in enumerate(messages):
        if message.role not in ROLES:
            raise FieldError(f"prompt.chat.messages[{i}].role", f"must be one of {', '.join(ROLES)}")
    if messages[-1].role != "user":
        raise FieldError("prompt.chat.messages", "the conversation must end with a user turn")


def sampling_from(params: completion_pb2.SamplingParams, settings: GenerationSettings) -> Sampling:
    """Bounds checked, defaults filled in; max_tokens above the cap is lowered to the cap."""
    temperature = params.temperature if params.HasField("temperature") else 1.0
    if not (0.0 <= temperature <= 2.0) or math.isnan(temperature):
        raise FieldError("sampling.temperature", "must be in [0, 2] (0 is greedy)")
    top_p = params.top_p if params.HasField("top_p") else 1.0
    if not (0.0 < top_p <= 1.0) or math.isnan(top_p):
        raise FieldError("sampling.top_p", "must be in (0, 1]")
    max_tokens = params.max_tokens if params.HasField("max_tokens") else settings.default_max_tokens
    if max_tokens < 1:
        raise FieldError("sampling.max_tokens", "must be at least 1")
    if len(params.stop) > MAX_STOP:
        raise FieldError("sampling.stop", f"at most {MAX_STOP} stop strings")
    for i, stop in enumerate(params.stop):
        if not stop or len(stop) > MAX_STOP_CHARS:
            raise FieldError(f"sampling.stop[{i}]", f"must have 1 to {MAX_STOP_CHARS} characters")
    seed = params.seed if params.HasField("seed") else None
    if seed is not None and seed > MAX_SEED:
        raise FieldError("sampling.seed", f"must be at most {MAX_SEED}")
    n = params.n if params.HasField("n") else 1
    if not (1 <= n <= MAX_N):
        raise FieldError("sampling.n", f"must be in [1, {MAX_N}]")
    return Sampling(
        temperature=float(temperature),
        top_p=float(top_p),
        max_tokens=min(max_tokens, settings.max_tokens_cap),
        stop=tuple(params.stop),
        seed=seed,
        n=n,
        logprobs=params.logprobs,
    )


def sampling_to_proto(s: Sampling) -> completion_pb2.SamplingParams:
    """The parameters in effect, for the completion record."""
    out = completion_pb2.SamplingParams(
        temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_tokens, stop=list(s.stop), n=s.n,
        logprobs=s.logprobs,
    )
    if s.seed is not None:
        out.seed = s.seed
    return out
