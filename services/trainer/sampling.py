"""How the online-RL loop samples its rollouts: plain softmax(logits / temperature), every row
from its own seed.

A row's seed depends on the run's seed, the step and the row's place in the step's global
batch, never on which process samples it or on the other rows of its batch. Two processes
then sample the tokens one process would, and a run resumed on another number of
processes samples what the uninterrupted run would have. `generate` runs greedy over the
scores plus Gumbel noise drawn from each row's generator (the Gumbel-max trick: the argmax
of logits / T + Gumbel(0, 1) is a draw from softmax(logits / T)), since its own sampling
draws every row from one shared generator.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from transformers import GenerationConfig, LogitsProcessor


def derived_seed(*parts: int) -> int:
    """A 63-bit seed for (run seed, step, row, ...): the same parts give the same seed anywhere."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def greedy_config(max_new_tokens: int, pad_id: int | None, eos_ids: set[int]) -> GenerationConfig:
    """`generate` picking the argmax of the processed scores, every other logits processor off.

    Each field is set even at its neutral value: `generate` fills unset fields from the
    model's generation_config.json and then from global defaults, and a repetition penalty
    or suppressed tokens inherited that way would sample from a distribution other than the
    softmax the loss scores.
    """
    return GenerationConfig(
        do_sample=False,
        num_beams=1,
        num_return_sequences=1,
        temperature=1.0,
        top_k=None,
        top_p=None,
        repetition_penalty=1.0,
        encoder_repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        encoder_no_repeat_ngram_size=0,
        bad_words_ids=None,
        sequence_bias=None,
        suppress_tokens=None,
        begin_suppress_tokens=None,
        forced_bos_token_id=None,
        forced_eos_token_id=None,
        min_new_tokens=0,
        max_new_tokens=max_new_tokens,
        renormalize_logits=False,
        remove_invalid_values=False,
        guidance_scale=None,
        pad_token_id=pad_id,
        eos_token_id=sorted(eos_ids),
    )


class SeededSampler(LogitsProcessor):
    """Turns greedy decoding into sampling from softmax(scores / temperature), row by row.

    `kept` (with keep=True) holds, per decoding step, the log-probabilities each row was
    sampled from: what a test compares with the trainer's own scoring of the tokens.
    """

    def __init__(self, seeds: Sequence[int], temperature: float, device: torch.device, *, keep: bool = False) -> None:
        self.temperature = temperature
        self.generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        self.kept: list[torch.Tensor] | None = [] if keep else None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scaled = scores.float() / self.temperature
        if self.kept is not None:
            self.kept.append(torch.log_softmax(scaled, dim=-1))
        vocab = scaled.shape[-1]
        uniform = torch.stack([torch.rand(vocab, generator=g, device=scaled.device) for g in self.generators])
        # u = 0 gives -inf (never picked), not nan.
        gumbel = -torch.log(-torch.log(uniform))
        return scaled + gumbel  # type: ignore[return-value]


@contextmanager
def model_generation_defaults_off(model: nn.Module) -> Iterator[None]:
    """Within: `generate` sees a blank model generation config, so nothing is inherited from it.

    The model's own config is put back afterwards: it is saved with the trained model and
    serving should keep it.
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # PeftModel delegates
    saved = inner.generation_config
    inner.generation_config = GenerationConfig()
    try:
        yield
    finally:
        inner.generation_config = saved
