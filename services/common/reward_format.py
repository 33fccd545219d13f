"""How a reward model sees a (prompt, response) pair, and how any scorer is judged against
human preferences.

Training (the trainer's reward stage) and serving (the Reward service) both turn pairs into
tokens through `encode` and score them through `score_pairs`, so a reward model is never
served on inputs shaped differently from the ones it learned on. The trap this avoids:
TRL's RewardTrainer appends eos and lets the tokenizer add its special tokens, while its
RLOO/GRPO trainers tokenise reward inputs with `add_special_tokens=False`.

`pairwise_accuracy` is the one measure of agreement with human labels, used for trained
reward models and for the LLM judge alike.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import pandas as pd
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

Message = dict[str, str]
# A raw prompt (text given as is) or a chat conversation ending with a user turn.
Prompt = str | list[Message]
# Scores `responses[i]` as an answer to `prompts[i]`; higher is better.
ScoreFn = Callable[[Sequence[Prompt], Sequence[str]], list[float]]

Label = Literal["preference", "tie", "both_bad"]
LABELS: tuple[Label, ...] = ("preference", "tie", "both_bad")
Agreement = Literal["unanimous", "split", "single"]


# ---- prompts ---------------------------------------------------------------------------


def normalize_prompt(prompt: Any) -> Prompt:
    """A prompt as text or as a list of {"role", "content"} dicts.

    Accepts what the places prompts come from hold: strings, lists of dicts, and the
    numpy arrays of dicts that Parquet rows come back as.
    """
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, Mapping) or not hasattr(prompt, "__iter__"):
        raise TypeError(f"a prompt is text or a list of chat messages, not {type(prompt).__name__}")
    messages = []
    for i, message in enumerate(prompt):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise TypeError(f"chat message {i} must have 'role' and 'content'")
        messages.append({"role": str(message["role"]), "content": str(message["content"])})
    if not messages:
        raise ValueError("a chat prompt needs at least one message")
    return messages


def prompt_key(prompt: Prompt) -> str:
    """A stable text key of a prompt (for grouping rows by prompt and caching scores)."""
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True, ensure_ascii=False)


def conversation_text(messages: Sequence[Message]) -> str:
    """Plain-text rendering of a conversation for models and judges without a chat template."""
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


# ---- tokens ----------------------------------------------------------------------------


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel | None = None) -> None:
    """Gives the tokenizer a pad token (eos if it has none) and tells the model about it.

    Decoder scorers pool the last token that is not padding, found through
    `config.pad_token_id`; a model and tokenizer that disagree on it score the wrong token.
    """
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has neither a pad nor an eos token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    if model is not None:
        model.config.get_text_config().pad_token_id = tokenizer.pad_token_id


def _is_pair_encoder(tokenizer: PreTrainedTokenizerBase) -> bool:
    # BERT-like encoders read "[CLS] prompt [SEP] response [SEP]" as two segments.
    return not tokenizer.chat_template and tokenizer.cls_token is not None and tokenizer.sep_token is not None


def encode(tokenizer: PreTrainedTokenizerBase, prompt: Prompt, response: str) -> list[int]:
    """THE token ids a reward model scores for `response` answering `prompt`.

    - Chat prompt, tokenizer with a chat template: the template applied to the
      conversation with the response appended as the assistant turn; the template's own
      special tokens only (none added by the tokenizer).
    - Encoder without a chat template (e.g. MiniLM): the pair "[CLS] prompt [SEP]
      response [SEP]", chat prompts rendered as "role: content" lines.
    - Otherwise (a raw prompt, or a decoder without a template): prompt text + response
      as is, then the tokenizer's eos, so the scored last token closes the answer.
    """
    if not isinstance(prompt, str) and tokenizer.chat_template:
        messages = [*prompt, {"role": "assistant", "content": response}]
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    prompt_text = prompt if isinstance(prompt, str) else conversation_text(prompt) + "\nassistant: "
    if _is_pair_encoder(tokenizer):
        return list(tokenizer(prompt_text, response, add_special_tokens=True)["input_ids"])
    ids = list(tokenizer(prompt_text + response, add_special_tokens=False)["input_ids"])
    return ids + [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else ids


def pad_batch(seqs: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), right-padded like TRL's preference collator.

    Right padding keeps each sequence's position ids the same as when it is alone, so a
    score does not depend on what it was batched with.
    """
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids, mask


def score_ids(
    model: PreTrainedModel, seqs: Sequence[Sequence[int]], pad_token_id: int, batch_size: int = 32
) -> list[float]:
    """Scalar rewards of already-encoded sequences, in order."""
    import torch

    scores: list[float] = []
    device = next(model.parameters()).device
    with torch.inference_mode():
        for start in range(0, len(seqs), batch_size):
            ids, mask = pad_batch(seqs[start : start + batch_size], pad_token_id)
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            scores.extend(logits[:, 0].float().cpu().tolist())
    return scores


def score_pairs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Prompt],
    responses: Sequence[str],
    batch_size: int = 32,
) -> list[float]:
    """Scalar rewards of (prompt, response) pairs: `encode`, then the model, in batches."""
    seqs = [encode(tokenizer, p, r) for p, r in zip(prompts, responses, strict=True)]
    return score_ids(model, seqs, tokenizer.pad_token_id, batch_size)


# ---- preference rows and agreement with them -------------------------------------------

REQUIRED_COLUMNS = ("prompt", "chosen", "rejected")


def _item_id(prompt: Prompt, a: str, b: str) -> str:
    # Two annotators judging the same two responses of one prompt judge the same item.
    text = json.dumps([prompt_key(prompt), *sorted((a, b))], ensure_ascii=False)
    return "item-" + hashlib.sha256(text.encode()).hexdigest()[:16]


def _verdict(row: Any) -> str:
    return f"preference:{row.chosen}" if row.label == "preference" else str(row.label)


def _agreement(rows: pd.DataFrame) -> list[Agreement]:
    # Judgements agree or not on one pair of responses: a ranking's item holds several
    # pairs, whose different winners are not a disagreement.
    groups = [
        (item, *sorted((c, r))) for item, c, r in zip(rows["item_id"], rows["chosen"], rows["rejected"], strict=True)
    ]
    verdicts: dict[tuple[str, str, str], list[str]] = {}
    for group, row in zip(groups, rows.itertuples(), strict=True):
        verdicts.setdefault(group, []).append(_verdict(row))
    kind = {g: "single" if len(v) == 1 else "unanimous" if len(set(v)) == 1 else "split" for g, v in verdicts.items()}
    return [kind[g] for g in groups]  # type: ignore[misc]


def prepare_rows(rows: pd.DataFrame) -> pd.DataFrame:
    """Preference rows in one shape; idempotent. Reads the preference store's rows as is.

    Columns: `prompt` (text or messages; the store's empty message list means a raw
    prompt, found in `prompt_raw`), `chosen`, `rejected` (for ties and both-bad, the two
    responses in the order shown), `label` ("preference", "tie", "both_bad"; default
    "preference"), `item_id` (default: the prompt and the two responses), and
    `agreement` (kept if the rows carry it): "single" for a pair judged once,
    "unanimous" when every judgement of the pair on that item gave the same verdict,
    else "split".
    """
    missing = [c for c in REQUIRED_COLUMNS if c not in rows.columns]
    if missing:
        raise ValueError(f"preference rows lack column(s) {missing}; have {list(rows.columns)}")
    out = rows.reset_index(drop=True).copy()
    prompts = list(out["prompt"])
    if "prompt_raw" in out.columns:
        prompts = [
            raw if not isinstance(p, str) and len(p) == 0 else p
            for p, raw in zip(prompts, out["prompt_raw"], strict=True)
        ]
    out["prompt"] = [normalize_prompt(p) for p in prompts]
    out["chosen"] = out["chosen"].astype(str)
    out["rejected"] = out["rejected"].astype(str)
    out["label"] = out["label"].fillna("preference").astype(str) if "label" in out.columns else "preference"
    bad = sorted(set(out["label"]) - set(LABELS))
    if bad:
        raise ValueError(f"unknown label(s) {bad}: expected one of {list(LABELS)}")
    if "item_id" not in out.columns:
        out["item_id"] = [_item_id(r.prompt, r.chosen, r.rejected) for r in out.itertuples()]
    out["item_id"] = out["item_id"].astype(str)
    if "agreement" not in out.columns:
        out["agreement"] = _agreement(out)
    return out


def pairwise_accuracy(rows: pd.DataFrame, score: ScoreFn, batch_size: int = 32) -> dict[str, float | int | None]:
    """Share of strict preferences where the scorer ranks the chosen response higher.

    Equal scores count half (a scorer with coarse scores, like a 1-10 judge, is neither
    right nor wrong on them). Ties and both-bad rows carry no order and are not scored.
    Reported overall and by the item's agreement: "unanimous", "split" and "single"
    (None where there is nothing to measure). A NaN score raises ValueError.
    """
    rows = prepare_rows(rows)
    pref = rows[rows["label"] == "preference"]
    wanted: dict[tuple[str, str], tuple[Prompt, str]] = {}
    for r in pref.itertuples():
        for response in (r.chosen, r.rejected):
            wanted.setdefault((prompt_key(r.prompt), response), (r.prompt, response))
    keys = list(wanted)
    scores: dict[tuple[str, str], float] = {}
    for start in range(0, len(keys), batch_size):
        chunk = keys[start : start + batch_size]
        got = score([wanted[k][0] for k in chunk], [wanted[k][1] for k in chunk])
        if len(got) != len(chunk):
            raise ValueError(f"scorer returned {len(got)} scores for {len(chunk)} pairs")
        for key, value in zip(chunk, got, strict=True):
            if math.isnan(value):
                raise ValueError(f"scorer returned NaN for a response to {key[0][:80]!r}")
            scores[key] = float(value)
    credit, ties = [], 0
    for r in pref.itertuples():
        k = prompt_key(r.prompt)
        gap = scores[(k, r.chosen)] - scores[(k, r.rejected)]
        ties += gap == 0
        credit.append(1.0 if gap > 0 else 0.5 if gap == 0 else 0.0)
    result: dict[str, float | int | None] = {
        "pairs": len(credit),
        "accuracy": sum(credit) / len(credit) if credit else None,
        "score_ties": int(ties),
    }
    for kind in ("unanimous", "split", "single"):
        sel = [c for c, a in zip(credit, pref["agreement"], strict=True) if a == kind]
        result[f"pairs_{kind}"] = len(sel)
        result[f"accuracy_{kind}"] = sum(sel) / len(sel) if sel else None
    return result
