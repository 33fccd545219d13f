"""Loading and saving models for the stages: registry refs, LoRA, atomic final folders,
and TRL configs built from our params."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneloop.common.registry import Registry, RegistrySettings
from tuneloop.trainer.config import ConfigError, DeviceParams, LoraParams
from tuneloop.trainer.distributed import ddp_backend, world_size

if TYPE_CHECKING:
    from peft import LoraConfig
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

FINAL_DIR = "model"
CHECKPOINTS_DIR = "checkpoints"


def registry(root: Path | None = None) -> Registry:
    return Registry(root or RegistrySettings().root)


def resolve(ref: str | Path, registry_root: Path | None = None) -> Path:
    """A model folder for a folder path or a registry ref such as `policy@production`."""
    text = str(ref)
    if Path(text).is_dir():
        return Path(text)
    if "@" in text and "/" not in text:
        return registry(registry_root).resolve(text)
    raise ConfigError(f"model {text!r} is neither a folder nor a registry ref (name@alias)")


def load_tokenizer(path: Path, *, padding_side: str = "right") -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = padding_side
    return tok


def load_policy(path: Path) -> PreTrainedModel:
    import torch
    from transformers import AutoModelForCausalLM

    # fp32 weights: mixed precision (bf16) is the trainer's business, and saved models stay exact.
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def lora_config(params: LoraParams, task_type: str = "CAUSAL_LM") -> LoraConfig | None:
    if not params.enabled:
        return None
    from peft import LoraConfig

    return LoraConfig(
        r=params.r,
        lora_alpha=params.alpha,
        lora_dropout=params.dropout,
        target_modules=params.target_modules,
        task_type=task_type,
    )


def save_final(model: Any, tokenizer: PreTrainedTokenizerBase, out_dir: Path) -> Path:
    """Writes the trained model as a plain transformers folder that appears all at once.

    LoRA adapters are merged so serving and the registry see one ordinary model. The
    folder is written under a temporary name and renamed, so a kill mid-save leaves no
    `model/` that looks complete.
    """
    from peft import PeftModel

    if isinstance(model, PeftModel):
        model = model.merge_and_unload()
    tmp = out_dir.with_name(f".{out_dir.name}.{uuid.uuid4().hex}.tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.rename(tmp, out_dir)
    return out_dir


def last_checkpoint(checkpoints: Path) -> Path | None:
    """The newest complete HF checkpoint folder (`checkpoint-N` with its trainer state)."""
    if not checkpoints.is_dir():
        return None
    found = [
        p
        for p in checkpoints.iterdir()
        if p.name.startswith("checkpoint-") and p.name[11:].isdigit() and (p / "trainer_state.json").is_file()
    ]
    return max(found, key=lambda p: int(p.name[11:]), default=None)


# Our param names that are TrainingArguments fields of the same meaning.
_SHARED = (
    "seed",
    "max_steps",
    "learning_rate",
    "lr_scheduler_type",
    "warmup_steps",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "max_grad_norm",
    "weight_decay",
    "logging_steps",
    "save_steps",
    "save_total_limit",
    "bf16",
    "gradient_checkpointing",
    "optim",
)


def trl_args(cls: type, params: DeviceParams, output_dir: Path, **specific: Any) -> Any:
    """A TRL config (`cls`) from our params (those of `_SHARED` the params have), the stage's
    own fields, then `trl_args` on top."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(params.trl_args) - known)
    if unknown:
        raise ConfigError(f"trl_args: {cls.__name__} has no field(s) {unknown}")
    fields = type(params).model_fields
    kwargs: dict[str, Any] = {name: getattr(params, name) for name in _SHARED if name in fields}
    kwargs.update(
        output_dir=str(output_dir / CHECKPOINTS_DIR),
        save_strategy="steps",
        report_to=[],
        disable_tqdm=True,
        data_seed=kwargs.get("seed"),
        dataloader_num_workers=0,
        use_cpu=not _has_gpu(),
    )
    if world_size() > 1:
        # Every parameter of a causal LM (or its adapters) gets a gradient each step; the
        # search for unused ones is an extra graph traversal per step for nothing.
        kwargs["ddp_find_unused_parameters"] = False
        backend = ddp_backend()
        if backend is not None:
            kwargs["ddp_backend"] = backend
    kwargs.update(specific)
    kwargs.update(params.trl_args)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"invalid training arguments for {cls.__name__}: {err}") from None


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()
