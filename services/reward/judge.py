"""The LLM-judge backend: scores a (prompt, response) pair by asking an OpenAI-compatible
chat endpoint to grade the response 1-10 against a rubric.

Judges answer in prose as often as in the asked format, so the score is read from the
forms they use ("Score: 7", "7/10", {"score": 7}, a bare "7"); an answer with none of them
is asked once more, with a reminder of the format, and then fails the call. A judge is a
reward model like any other here: its agreement with human labels is measured by the same
`pairwise_accuracy` (see `scorer.agreement_with_labels`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from tuneloop.common import reward_format as rf
from tuneloop.common.errors import FieldError
from tuneloop.reward import metrics
from tuneloop.reward.scorer import Unavailable
from tuneloop.reward.settings import RewardSettings
from tuneloop.v1 import completion_pb2

SCALE = (1.0, 10.0)
FORMAT = "End your answer with a line `Score: N`, where N is an integer from 1 (worst) to 10 (best)."
REMINDER = "Your answer had no score. Reply with only `Score: N`, where N is an integer from 1 to 10."

_NUMBER = r"(\d+(?:\.\d+)?)"
_PATTERNS = (
    re.compile(rf"score(?:\s+of)?[\s:*\"'=]{{0,5}}{_NUMBER}", re.IGNORECASE),  # Score: 7, **Score**: 7, "score": 7
    re.compile(rf"{_NUMBER}\s*(?:/|out of)\s*10\b", re.IGNORECASE),  # 7/10, 7 out of 10
    re.compile(rf"^[\s*]*{_NUMBER}[\s.*]*$"),  # a bare number
)


class JudgeError(RuntimeError):
    """The judge answered, but not with a usable score (or refused the request)."""


def parse_score(text: str) -> float | None:
    """The 1-10 score in a judge's answer (the last one stated), or None."""
    for pattern in _PATTERNS:
        found = pattern.findall(text)
        if found:
            value = float(found[-1])
            return value if math.isfinite(value) and SCALE[0] <= value <= SCALE[1] else None
    return None


def _prompt_text(prompt: rf.Prompt) -> str:
    return prompt if isinstance(prompt, str) else rf.conversation_text(prompt)


class JudgeScorer:
    """A `Scorer` backed by an OpenAI-compatible `/chat/completions` endpoint."""

    def __init__(
        self,
        base_url: str,
        model: str,
        rubric: str,
        *,
        api_key: str = "",
        timeout_s: float = 60.0,
        concurrency: int = 8,
        max_tokens: int = 64,
    ) -> None:
        self.model = model
        self.version = completion_pb2.ModelVersion(name="judge", version=model)
        self.system = f"{rubric.strip()}\n\n{FORMAT}"
        self.max_tokens = max_tokens
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=base_url.rstrip("/") + "/", headers=headers, timeout=timeout_s)
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="reward-judge")

    @classmethod
    def from_settings(cls, s: RewardSettings) -> JudgeScorer:
        """The judge of settings with backend="judge" (whose validation made them complete)."""
        return cls(
            s.judge_base_url,
            s.judge_model,
            Path(s.judge_rubric_path).read_text(),
            api_key=s.judge_api_key.get_secret_value(),
            timeout_s=s.judge_timeout_s,
            concurrency=s.judge_concurrency,
            max_tokens=s.judge_max_tokens,
        )

    def prepare(self, prompt: rf.Prompt, response: str, field: str) -> tuple[rf.Prompt, str]:
        return prompt, response

    def score(self, prepared: list[tuple[rf.Prompt, str]]) -> list[float]:
        return list(self._pool.map(self._score_one, prepared))

    def score_pairs(self, prompts: Sequence[rf.Prompt], responses: Sequence[str]) -> list[float]:
        return self.score(list(zip(prompts, responses, strict=True)))

    def close(self) -> None:
        self._pool.shutdown()
        self._http.close()

    def _score_one(self, pair: tuple[rf.Prompt, str]) -> float:
        prompt, response = pair
        messages = [
            {"role": "system", "content": self.system},
            {"role": "user", "content": f"Prompt:\n{_prompt_text(prompt)}\n\nResponse:\n{response}"},
        ]
        answer = self._chat(messages)
        score = parse_score(answer)
        if score is None:
            messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": REMINDER}]
            answer = self._chat(messages)
            score = parse_score(answer)
        if score is None:
            raise JudgeError(f"judge {self.model} gave no 1-10 score twice; last answer: {answer[:200]!r}")
        return score

    def _chat(self, messages: list[dict[str, str]]) -> str:
        body = {"model": self.model, "messages": messages, "temperature": 0, "max_tokens": self.max_tokens}
        try:
            reply = self._http.post("chat/completions", json=body)
        except httpx.HTTPError as err:
            raise Unavailable(f"judge endpoint unreachable: {err!r}") from err
        if reply.status_code == 429 or reply.status_code >= 500:
            raise Unavailable(f"judge endpoint answered {reply.status_code}: {reply.text[:200]}")
        if reply.status_code >= 400:
            raise JudgeError(f"judge endpoint refused the request ({reply.status_code}): {reply.text[:200]}")
        try:
            content = reply.json()["choices"][0]["message"]["content"]
        except (json.JSONDecodeError, KeyError, IndexError, TypeError) as err:
            raise JudgeError(f"judge endpoint sent no chat completion: {reply.text[:200]}") from err
        return content or ""


class JudgeCatalog:
    """The judge as the only scorer: a call's `model` is "" or the judge model's name."""

    def __init__(self, judge: JudgeScorer) -> None:
        self.judge = judge

    def get(self, ref: str) -> JudgeScorer:
        if ref not in ("", self.judge.model, f"judge@{self.judge.model}"):
            raise FieldError("model", f"this server scores with the judge {self.judge.model!r}; leave model empty")
        return self.judge

    ready = True

    def start(self, on_ready: Callable[[], None]) -> None:
        metrics.MODEL_INFO.labels("judge", f"judge@{self.judge.model}").set(1)

    def close(self) -> None:
        self.judge.close()
