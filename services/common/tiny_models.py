"""Tiny seeded models made on the spot, for tests and demos: a byte-level BPE tokenizer with a
ChatML template, and a ~0.1M-parameter policy and reward model that depend on the seed only.

torch and transformers are imported inside functions so the CLI starts fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

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
