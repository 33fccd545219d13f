"""The TRL-backed stages: SFT, DPO, and RLOO/GRPO.

Each stage trains in `output_dir/checkpoints/` (HF Trainer checkpoints, resumable), logs
every step to `output_dir/metrics.jsonl` and the trainer gauges, and writes the final
model to `output_dir/model/` in one rename; `output_dir/stage.json` says it finished.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from tuneloop.trainer.config import (
    ConfigError,
    DPOParams,
    DPOStageConfig,
    MetricsParams,
    OnlineRLParams,
    OnlineRLStageConfig,
    SFTStageConfig,
    TrainParams,
)
from tuneloop.trainer.data import prompt_dataset, prompt_rows, sft_dataset
from tuneloop.trainer.distributed import barrier, check_ranks_agree, is_main_process, world_size
from tuneloop.trainer.metrics import MetricsCallback, StepMetrics
from tuneloop.trainer.modeling import (
    CHECKPOINTS_DIR,
    FINAL_DIR,
    last_checkpoint,
    load_policy,
    load_tokenizer,
    lora_config,
    resolve,
    save_final,
    trl_args,
)
from tuneloop.trainer.rewards import RewardFunc, reward_function
from tuneloop.trainer.watch import HackingWatch, criteria_eval
from tuneloop.trainer.weighting import weighted

log = logging.getLogger(__name__)

STAGE_FILE = "stage.json"


@dataclass
class StageResult:
    stage: str
    model_dir: str
    steps: int
    train_loss: float | None
    seconds: float
    resumed_from: str | None
    watch_flags: list[dict[str, Any]] = field(default_factory=list)
    processes: int = 1  # data-parallel training processes (torchrun / accelerate launch)
    weights_sha256: str | None = None  # of the trained weights, the same in every process

    def write(self, output_dir: Path) -> None:
        (output_dir / STAGE_FILE).write_text(json.dumps(asdict(self), indent=2))


def checkpoint_to_resume(output_dir: Path, resume: bool) -> Path | None:
    """The checkpoint to continue from; refuses to silently train over an earlier run's."""
    found = last_checkpoint(output_dir / CHECKPOINTS_DIR)
    if found is not None and not resume:
        raise ConfigError(
            f"output_dir: {output_dir} already holds checkpoints ({found.name}); resume it or choose a new folder"
        )
    return found


class Observers:
    """A stage's step metrics and hacking watch, as trainer callbacks."""

    def __init__(self, stage: str, params: TrainParams, model_path: Path, output_dir: Path,
                 metrics: MetricsParams | None, criteria: Path | None = None) -> None:
        self.sink = StepMetrics(output_dir, stage, metrics)
        criteria = params.watch.criteria or criteria
        eval_fn = None
        if params.watch.eval_every and criteria is not None:
            eval_fn = criteria_eval(criteria, model_path, params.watch.eval_prompts)
        elif params.watch.eval_every:
            raise ConfigError("watch.eval_every: set watch.criteria, the file whose checks make the eval metric")
        self.watch = HackingWatch(params.watch, self.sink, eval_fn)

    @property
    def callbacks(self) -> list[Any]:
        return [MetricsCallback(self.sink), self.watch]


def _train(
    stage: str,
    trainer: Any,
    tokenizer: Any,
    output_dir: Path,
    resume: bool,
    observers: Observers,
) -> StageResult:
    from transformers import PrinterCallback

    # Steps are logged as JSON by MetricsCallback; the printer would repeat them as Python dicts.
    trainer.remove_callback(PrinterCallback)
    started = time.monotonic()
    checkpoint = checkpoint_to_resume(output_dir, resume)
    if checkpoint is not None:
        log.info("resuming %s from %s", stage, checkpoint)
    out = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    # Sharded training (FSDP, DeepSpeed ZeRO) holds different parts in each process by design.
    sharded = bool(getattr(trainer, "is_fsdp_enabled", False) or getattr(trainer, "is_deepspeed_enabled", False))
    digest = None if sharded else check_ranks_agree(trainer.model)
    model_dir = output_dir / FINAL_DIR
    result = StageResult(
        stage=stage,
        model_dir=str(model_dir),
        steps=int(out.global_step),
        train_loss=float(out.training_loss) if out.training_loss is not None else None,
        seconds=round(time.monotonic() - started, 2),
        resumed_from=str(checkpoint) if checkpoint else None,
        watch_flags=observers.watch.flags,
        processes=world_size(),
        weights_sha256=digest,
    )
    if is_main_process():
        save_final(trainer.model, tokenizer, model_dir)
        result.write(output_dir)
        observers.sink.finished()
    # No process returns (and goes on to read model/) before the main one has written it.
    barrier()
    return result


def _setup(params: TrainParams, model_ref: str, output_dir: Path, registry_root: Path | None) -> tuple[Any, Any, Path]:
    from transformers import set_seed

    set_seed(params.seed)
    output_dir.mkdir(parents=True, exist_ok=True)
    path = resolve(model_ref, registry_root)
    return load_policy(path), load_tokenizer(path), path


def run_sft(config: SFTStageConfig, *, resume: bool = False) -> StageResult:
    from trl import SFTConfig, SFTTrainer

    dataset = sft_dataset(config.data)
    model, tokenizer, path = _setup(config, config.model, config.output_dir, config.registry_root)
    observers = Observers("sft", config, path, config.output_dir, config.metrics)
    args = trl_args(
        SFTConfig,
        config,
        config.output_dir,
        max_length=config.max_length,
        completion_only_loss=config.completion_only_loss,
        packing=False,
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora_config(config.lora),
        callbacks=observers.callbacks,
    )
    return _train("sft", trainer, tokenizer, config.output_dir, resume, observers)


def run_dpo_on(
    params: DPOParams,
    model_ref: str,
    dataset: Any,
    output_dir: Path,
    *,
    registry_root: Path | None = None,
    metrics: MetricsParams | None = None,
    resume: bool = False,
    criteria: Path | None = None,
) -> StageResult:
    """DPO of `model_ref` on a TRL preference dataset (also the retrain pipeline's default);
    `criteria` makes the hacking watch's eval metric unless `watch.criteria` names another.
    A `weight` column in `dataset` sets how often each row is drawn (weighting.py)."""
    from trl import DPOConfig, DPOTrainer

    model, tokenizer, path = _setup(params, model_ref, output_dir, registry_root)
    observers = Observers("dpo", params, path, output_dir, metrics, criteria)
    ref_model = load_policy(resolve(params.reference, registry_root)) if params.reference else None
    loss_type = params.loss_type if isinstance(params.loss_type, list) else [params.loss_type]
    args = trl_args(
        DPOConfig,
        params,
        output_dir,
        beta=params.beta,
        loss_type=loss_type,
        label_smoothing=params.label_smoothing,
        max_length=params.max_length,
    )
    trainer = weighted(DPOTrainer)(
        model=model,
        ref_model=ref_model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora_config(params.lora),
        callbacks=observers.callbacks,
    )
    return _train("dpo", trainer, tokenizer, output_dir, resume, observers)


def run_dpo(config: DPOStageConfig, *, resume: bool = False) -> StageResult:
    from tuneloop.trainer.data import load_preferences, to_dpo_dataset

    pref = config.preferences
    dataset = to_dpo_dataset(load_preferences(pref), pref.tie_policy, pref.both_bad_policy, pref.honour_weight)
    return run_dpo_on(
        config,
        config.model,
        dataset,
        config.output_dir,
        registry_root=config.registry_root,
        metrics=config.metrics,
        resume=resume,
    )


Algorithm = Literal["rloo", "grpo"]


def run_online_rl_on(
    algorithm: Algorithm,
    params: OnlineRLParams,
    model_ref: str,
    prompts: list[Any],
    reward: RewardFunc,
    output_dir: Path,
    *,
    registry_root: Path | None = None,
    metrics: MetricsParams | None = None,
    resume: bool = False,
    criteria: Path | None = None,
) -> StageResult:
    """RLOO or GRPO (TRL) of `model_ref` on `prompts`, rewarded by `reward`."""
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    config_cls, trainer_cls = (RLOOConfig, RLOOTrainer) if algorithm == "rloo" else (GRPOConfig, GRPOTrainer)
    model, tokenizer, path = _setup(params, model_ref, output_dir, registry_root)
    observers = Observers(algorithm, params, path, output_dir, metrics, criteria)
    args = trl_args(
        config_cls,
        params,
        output_dir,
        beta=params.beta,
        epsilon=params.epsilon,
        num_generations=params.num_generations,
        max_completion_length=params.max_completion_length,
        temperature=params.temperature,
    )
    trainer = trainer_cls(
        model=model,
        reward_funcs=reward,
        args=args,
        train_dataset=prompt_dataset(prompts),
        processing_class=load_tokenizer(path, padding_side="left"),
        peft_config=lora_config(params.lora),
        callbacks=observers.callbacks,
    )
    return _train(algorithm, trainer, tokenizer, output_dir, resume, observers)


def run_online_rl(algorithm: Algorithm, config: OnlineRLStageConfig, *, resume: bool = False) -> StageResult:
    return run_online_rl_on(
        algorithm,
        config,
        config.model,
        prompt_rows(config.prompts),
        reward_function(config.reward, config.registry_root),
        config.output_dir,
        registry_root=config.registry_root,
        metrics=config.metrics,
        resume=resume,
    )
