"""Client of the Reward service, and the reward function TRL's online trainers call.

`RewardClient(target).as_reward_func()` plugs the service into GRPO/RLOO as one of
`reward_funcs`: TRL passes prompts and completions either as strings or as chat messages,
and the service formats them exactly as the reward model was trained (the client sends
the conversation, never pre-rendered text).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from tuneloop.common.grpc_client import make_channel
from tuneloop.common.reward_format import normalize_prompt
from tuneloop.reward.formatting import to_proto_prompt
from tuneloop.v1 import completion_pb2, reward_pb2, reward_pb2_grpc

SERVICE = reward_pb2.DESCRIPTOR.services_by_name["Reward"].full_name

RewardFunc = Callable[..., list[float]]


def completion_text(completion: Any) -> str:
    """A completion as text: TRL gives a string, or (conversational) a list of messages."""
    if isinstance(completion, str):
        return completion
    return "".join(str(m["content"]) for m in completion if isinstance(m, Mapping) and m.get("role") == "assistant")


class RewardClient:
    """Scores pairs through the Reward service, with a deadline per call and retries on
    UNAVAILABLE (from the channel's service config); large inputs go in several requests."""

    def __init__(
        self,
        target: str,
        *,
        model: str = "",
        timeout_s: float = 30.0,
        attempts: int = 4,
        max_items: int = 256,
    ) -> None:
        self.model = model
        self.timeout_s = timeout_s
        self.max_items = max_items
        self.channel = make_channel(target, SERVICE, attempts=attempts, timeout_s=timeout_s)
        self.stub = reward_pb2_grpc.RewardStub(self.channel)
        # The version that scored the latest call, so a trainer can log what rewarded it.
        self.last_version: completion_pb2.ModelVersion | None = None

    def score(self, prompts: Sequence[Any], responses: Sequence[str]) -> list[float]:
        """One score per (prompt, response); prompts are text or lists of chat messages."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        items = [
            reward_pb2.ScoreItem(prompt=to_proto_prompt(normalize_prompt(p)), response=r)
            for p, r in zip(prompts, responses, strict=True)
        ]
        scores: list[float] = []
        for start in range(0, len(items), self.max_items):
            request = reward_pb2.ScoreRequest(items=items[start : start + self.max_items], model=self.model)
            reply = self.stub.Score(request, timeout=self.timeout_s)
            scores.extend(reply.scores)
            self.last_version = reply.model
        return scores

    def as_reward_func(self) -> RewardFunc:
        """`f(prompts, completions, **kw) -> list[float]`, the shape TRL's `reward_funcs` take."""

        def reward_service(prompts: Sequence[Any], completions: Sequence[Any], **_: Any) -> list[float]:
            return self.score(prompts, [completion_text(c) for c in completions])

        return reward_service

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> RewardClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
