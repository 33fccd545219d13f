"""Score requests as the scorers see them: each `ScoreItem` checked field by field and
turned into the (prompt, response) form of `tuneloop.common.reward_format`, whose `encode`
is the same one the reward stage trains with."""

from __future__ import annotations

from tuneloop.common.errors import FieldError
from tuneloop.common.reward_format import Prompt
from tuneloop.v1 import completion_pb2, reward_pb2

ROLES = ("system", "user", "assistant")


def prompt_of(prompt: completion_pb2.Prompt, field: str, max_chars: int) -> Prompt:
    """The prompt as text (raw) or messages (chat); FieldError names what is wrong."""
    form = prompt.WhichOneof("input")
    if form is None:
        raise FieldError(field, "required: set chat or raw")
    if form == "raw":
        if len(prompt.raw) > max_chars:
            raise FieldError(f"{field}.raw", f"{len(prompt.raw)} characters, more than the limit {max_chars}")
        return prompt.raw
    messages = prompt.chat.messages
    if not messages:
        raise FieldError(f"{field}.chat.messages", "a chat prompt needs at least one message")
    for i, m in enumerate(messages):
        if m.role not in ROLES:
            raise FieldError(f"{field}.chat.messages[{i}].role", f"must be one of {', '.join(ROLES)}, not {m.role!r}")
    total = sum(len(m.content) for m in messages)
    if total > max_chars:
        raise FieldError(f"{field}.chat", f"{total} characters in all turns, more than the limit {max_chars}")
    return [{"role": m.role, "content": m.content} for m in messages]


def items_of(
    request: reward_pb2.ScoreRequest, max_items: int, max_prompt_chars: int, max_response_chars: int
) -> list[tuple[Prompt, str]]:
    """The request's (prompt, response) pairs, in order; FieldError for the first bad field."""
    if not request.items:
        raise FieldError("items", "at least one item is required")
    if len(request.items) > max_items:
        raise FieldError("items", f"{len(request.items)} items, more than the limit {max_items} per request")
    out = []
    for i, item in enumerate(request.items):
        if not item.HasField("prompt"):
            raise FieldError(f"items[{i}].prompt", "required")
        prompt = prompt_of(item.prompt, f"items[{i}].prompt", max_prompt_chars)
        if len(item.response) > max_response_chars:
            raise FieldError(
                f"items[{i}].response", f"{len(item.response)} characters, more than the limit {max_response_chars}"
            )
        out.append((prompt, item.response))
    return out


def to_proto_prompt(prompt: Prompt) -> completion_pb2.Prompt:
    """The wire form of a prompt (clients build requests with it)."""
    if isinstance(prompt, str):
        return completion_pb2.Prompt(raw=prompt)
    return completion_pb2.Prompt(
        chat=completion_pb2.Conversation(
            messages=[completion_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in prompt]
        )
    )
