"""Token ids to streamed text: incremental detokenisation with stop strings.

Text is emitted only once it can no longer change: a trailing partial UTF-8 character
(decoded as U+FFFD) and a tail that could still grow into a stop string are held back, so
the concatenated deltas always equal the final text and never contain a stop string.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

_REPLACEMENT = "\ufffd"


def _held_back(text: str, stop: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
    longest = 0
    for s in stop:
        for k in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:k]):
                longest = k
                break
    return longest


class TextTracker:
    """Follows one candidate's generated ids; `add` returns the text that became final."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: tuple[str, ...]) -> None:
        self._tok = tokenizer
        self._stop = stop
        self._ids: list[int] = []
        self._text = ""
        self._emitted = 0
        self.stopped = False

    @property
    def text(self) -> str:
        """The final text so far (cut before a stop string once one matched)."""
        return self._text[: self._emitted] if self.stopped else self._text

    def add(self, token_id: int) -> str:
        """Append a generated id; returns the newly final text. Sets `stopped` on a stop string."""
        self._ids.append(token_id)
        self._text = self._tok.decode(self._ids, skip_special_tokens=True)
        # A stop string can only start where nothing was emitted yet (earlier text was checked).
        start = max(0, self._emitted - max((len(s) for s in self._stop), default=0))
        hits = [i for i in (self._text.find(s, start) for s in self._stop) if i >= 0]
        if hits:
            cut = min(hits)
            self.stopped = True
            delta, self._emitted = self._text[self._emitted : cut], cut
            return delta
        end = len(self._text)
        if self._text.endswith(_REPLACEMENT):
            end = len(self._text.rstrip(_REPLACEMENT))
        end = min(end, len(self._text) - _held_back(self._text, self._stop))
        if end <= self._emitted:
            return ""
        delta, self._emitted = self._text[self._emitted : end], end
        return delta

    def flush(self) -> str:
        """At the end of the candidate: whatever was held back is final now."""
        if self.stopped:
            return ""
        delta, self._emitted = self._text[self._emitted :], len(self._text)
        return delta
