"""Variants of the tiny policy that tests need."""

from __future__ import annotations

import json
import shutil
from pathlib import Path


def stopping_policy(policy: Path, out: Path) -> Path:
    """A copy of `policy` that stops on a quarter of its vocabulary: sampled responses that end
    at an eos, of varied length, beside responses cut at the token limit (the tiny policy by
    itself almost never samples its one eos)."""
    shutil.copytree(policy, out)
    generation = json.loads((out / "generation_config.json").read_text())
    vocab = json.loads((out / "config.json").read_text())["vocab_size"]
    generation["eos_token_id"] = [generation["eos_token_id"], *range(4, vocab, 4)]
    (out / "generation_config.json").write_text(json.dumps(generation))
    return out
