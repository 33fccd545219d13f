"""Incremental detokenisation: what is streamed never has to be taken back."""

from __future__ import annotations

import pytest
from transformers import PreTrainedTokenizerBase

from tuneloop.common.tiny_models import tiny_tokenizer
from tuneloop.common.settings import SettingsError, load_settings
from tuneloop.generation.engines.text import TextTracker
from tuneloop.generation.settings import GenerationSettings


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerBase:
    return tiny_tokenizer()


def _stream(tok: PreTrainedTokenizerBase, text: str, stop: tuple[str, ...]) -> tuple[list[str], TextTracker]:
    tracker = TextTracker(tok, stop)
    deltas = []
    for token in tok(text, add_special_tokens=False)["input_ids"]:
        deltas.append(tracker.add(token))
        if tracker.stopped:
            return deltas, tracker
    deltas.append(tracker.flush())
    return deltas, tracker


def test_stop_string_across_tokens_is_never_streamed(tok: PreTrainedTokenizerBase) -> None:
    deltas, tracker = _stream(tok, "The capital of France is Paris. The capital of Italy is Rome.", ("Paris.",))
    assert tracker.stopped
    assert "".join(deltas) == tracker.text == "The capital of France is "
    assert not any("P" in d for d in deltas)


def test_text_without_a_stop_is_streamed_whole(tok: PreTrainedTokenizerBase) -> None:
    text = "Water boils at one hundred degrees. Par"
    deltas, tracker = _stream(tok, text, ("Paris",))
    assert not tracker.stopped
    assert "".join(deltas) == tracker.text == text


def test_split_characters_are_held_until_complete(tok: PreTrainedTokenizerBase) -> None:
    text = "café 🙂 naïve"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text.split())  # the non-ASCII characters span several byte tokens
    deltas, tracker = _stream(tok, text, ())
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == text


def test_invalid_settings_name_the_field(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNELOOP_GENERATION_ENGINE", "tensorrt")
    with pytest.raises(SettingsError, match="TUNELOOP_GENERATION_ENGINE"):
        load_settings(GenerationSettings)
    monkeypatch.delenv("TUNELOOP_GENERATION_ENGINE")
    with pytest.raises(SettingsError, match="max_batch_size"):
        load_settings(GenerationSettings, max_batch_size=0)
    assert load_settings(GenerationSettings, port=7000).spool_file().name == "completions-7000.spool"
