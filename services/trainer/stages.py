"""The TRL-backed stages: SFT, DPO, and RLOO/GRPO, and what every stage shares.

A policy algorithm trains `StageRun.model` on `StageData` (pairs, or prompts and a reward
function) into `StageRun.output_dir`; its stage config (`tuneloop train NAME`) and retrain's
pipeline both build those two and call the same function (algorithms.py names them). Each
stage trains in `output_dir/checkpoints/` (HF Trainer checkpoints, resumable), logs
every step to `output_dir/metrics.jsonl` and the trainer gauges, and writes the final
model to `output_dir/model/` in one rename; `output_dir/stage.json` says it finished.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

from tuneloop.common.durable import write_atomic
from tuneloop.trainer import vllm_rollouts
from tuneloop.trainer.config import (
    ConfigError,
    DPOParams,
    DPOStageConfig,
    MetricsParams,
    OnlineRLParams,
    OnlineRLStageConfig,
    PPOStageConfig,
    SFTStageConfig,
    StageBase,
    TrainParams,
)
from tuneloop.trainer.data import Messages, prompt_dataset, prompt_rows, sft_dataset, unique_prompts
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
class Registration:
    """The model version a stage registered itself (the reward stage) and its gate's verdict."""

    ref: str
    version: str
    promoted: bool
    refused_reason: str | None  # why the gate kept it from its alias; None when it passed
    metrics: dict[str, Any]  # as in the version's card


@dataclass
class StageResult:
    """What every stage returns: written as stage.json, printed by `tuneloop train`."""

    stage: str
    model_dir: str
    steps: int
    train_loss: float | None
    seconds: float
    resumed_from: str | None
    watch_flags: list[dict[str, Any]] = field(default_factory=list)
    processes: int = 1  # data-parallel training processes (torchrun / accelerate launch)
    weights_sha256: str | None = None  # of the trained weights, the same in every process
    registered: Registration | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def write(self, output_dir: Path) -> None:
        # retrain takes a stage.json as a finished stage: a torn one must never appear.
        write_atomic(output_dir / STAGE_FILE, json.dumps(self.to_json(), indent=2).encode())


@dataclass(frozen=True)
class StageRun:
    """Where a stage starts and writes, and what watches it."""

    model: str  # the starting policy: a folder or a registry ref
    output_dir: Path
    registry_root: Path | None = None
    metrics: MetricsParams | None = None
    resume: bool = False
    # Makes the hacking watch's eval metric unless the params' watch.criteria names another.
    criteria: Path | None = None

    @classmethod
    def of(cls, config: StageBase, resume: bool) -> StageRun:
        return cls(config.model, config.output_dir, config.registry_root, config.metrics, resume)


@dataclass(frozen=True)
class StageData:
    """What a policy algorithm trains on: preference pairs (DPO), or prompts and a reward
    function (online RL)."""

    preferences: Any = None  # a TRL preference dataset (prompt/chosen/rejected[/weight])
    prompts: list[Messages] | None = None  # unset: the preference pairs' distinct prompts
    reward: RewardFunc | None = None

    def pairs(self, stage: str) -> Any:
        if self.preferences is None:
            raise ConfigError(f"{stage} trains on preference pairs; none were given")
        return self.preferences

    def prompt_set(self, stage: str) -> list[Any]:
        if self.prompts is not None:
            return self.prompts
        return unique_prompts(self.pairs(stage))

    def reward_func(self, stage: str) -> RewardFunc:
        if self.reward is None:
            raise ConfigError(f"{stage} needs a reward function (a reward model or the Reward service)")
        return self.reward


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


def conclude(
    stage: str,
    output_dir: Path,
    observers: Observers,
    save: Callable[[Path], None],
    *,
    steps: int,
    train_loss: float | None,
    started: float,
    checkpoint: Path | None,
    weights_sha256: str | None = None,
) -> StageResult:
    """A trained stage's result: the main process saves the model (`save(model_dir)`), then
    stage.json and the final gauges; every process returns once that is written."""
    model_dir = output_dir / FINAL_DIR
    result = StageResult(
        stage=stage,
        model_dir=str(model_dir),
        steps=steps,
        train_loss=train_loss,
        seconds=round(time.monotonic() - started, 2),
        resumed_from=str(checkpoint) if checkpoint else None,
        watch_flags=observers.watch.flags,
        processes=world_size(),
        weights_sha256=weights_sha256,
    )
    if is_main_process():
        save(model_dir)
        result.write(output_dir)
        observers.sink.finished()
    # No process returns (and goes on to read model/) before the main one has written it.
    barrier()
    return result


def _train(
    stage: str,
    trainer: Any,
    tokenizer: Any,
    run: StageRun,
    observers: Observers,
) -> StageResult:
    from transformers import PrinterCallback

    # Steps are logged as JSON by MetricsCallback; the printer would repeat them as Python dicts.
    trainer.remove_callback(PrinterCallback)
    started = time.monotonic()
    checkpoint = checkpoint_to_resume(run.output_dir, run.resume)
    if checkpoint is not None:
        log.info("resuming %s from %s", stage, checkpoint)
    out = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    # Sharded training (FSDP, DeepSpeed ZeRO) holds different parts in each process by design.
    sharded = bool(getattr(trainer, "is_fsdp_enabled", False) or getattr(trainer, "is_deepspeed_enabled", False))
    return conclude(
        stage,
        run.output_dir,
        observers,
        lambda model_dir: save_final(trainer.model, tokenizer, model_dir),
        steps=int(out.global_step),
        train_loss=float(out.training_loss) if out.training_loss is not None else None,
        started=started,
        checkpoint=checkpoint,
        weights_sha256=None if sharded else check_ranks_agree(trainer.model),
    )


def _setup(params: TrainParams, run: StageRun, stage: str) -> tuple[Any, Any, Path, Observers]:
    from transformers import set_seed

    set_seed(params.seed)
    run.output_dir.mkdir(parents=True, exist_ok=True)
    path = resolve(run.model, run.registry_root)
    observers = Observers(stage, params, path, run.output_dir, run.metrics, run.criteria)
    return load_policy(path), load_tokenizer(path), path, observers


def _trainer(
    cls: Any, params: TrainParams, model: Any, args: Any, dataset: Any, tokenizer: Any, observers: Observers,
    **specific: Any,
) -> Any:
    """A TRL trainer of the stage's model, data and config, with its LoRA and observers."""
    return cls(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora_config(params.lora),
        callbacks=observers.callbacks,
        **specific,
    )


def run_sft(config: SFTStageConfig, *, resume: bool = False) -> StageResult:
    from trl import SFTConfig, SFTTrainer

    dataset = sft_dataset(config.data)
    run = StageRun.of(config, resume)
    model, tokenizer, _, observers = _setup(config, run, "sft")
    args = trl_args(
        SFTConfig,
        config,
        config.output_dir,
        max_length=config.max_length,
        completion_only_loss=config.completion_only_loss,
        packing=False,
    )
    trainer = _trainer(SFTTrainer, config, model, args, dataset, tokenizer, observers)
    return _train("sft", trainer, tokenizer, run, observers)


def run_dpo_on(params: DPOParams, data: StageData, run: StageRun) -> StageResult:
    """DPO of `run.model` on `data.preferences` (a TRL preference dataset). A `weight` column
    sets how often each row is drawn (weighting.py); `replay.prompts` adds the replay NLL
    term (replay.py)."""
    from trl import DPOConfig, DPOTrainer

    from tuneloop.trainer import replay as rp

    dataset = data.pairs("dpo")
    # Before anything loads: a replay prompt that is also a criteria prompt fails at once.
    replay_prompts = rp.replay_prompts(params.replay, params.watch.criteria or run.criteria)
    model, tokenizer, _, observers = _setup(params, run, "dpo")
    ref_model = load_policy(resolve(params.reference, run.registry_root)) if params.reference else None
    loss_type = params.loss_type if isinstance(params.loss_type, list) else [params.loss_type]
    args = trl_args(
        DPOConfig,
        params,
        run.output_dir,
        beta=params.beta,
        loss_type=loss_type,
        label_smoothing=params.label_smoothing,
        max_length=params.max_length,
    )
    trainer_cls, specific = weighted(DPOTrainer), {}
    if replay_prompts is not None:
        # The parent answers now, while `model` is still the parent; the training arguments
        # have set up the processes, so the main one writes and the others wait for its file.
        model.to(args.device)
        rows = rp.parent_answers(params.replay, replay_prompts, model, tokenizer, run.output_dir)
        trainer_cls = rp.with_replay(trainer_cls)
        specific["replay"] = rp.ReplaySet.of(params.replay, rows, tokenizer, params.max_length)
    trainer = _trainer(trainer_cls, params, model, args, dataset, tokenizer, observers, ref_model=ref_model, **specific)
    return _train("dpo", trainer, tokenizer, run, observers)


def run_dpo(config: DPOStageConfig, *, resume: bool = False) -> StageResult:
    from tuneloop.trainer.data import load_preferences, to_dpo_dataset

    dataset = to_dpo_dataset(load_preferences(config.preferences), config.preferences.honour_weight, seed=config.seed)
    return run_dpo_on(config, StageData(preferences=dataset), StageRun.of(config, resume))


Algorithm = Literal["rloo", "grpo"]


def run_online_rl_on(algorithm: Algorithm, params: OnlineRLParams, data: StageData, run: StageRun) -> StageResult:
    """RLOO or GRPO (TRL) of `run.model` on `data`'s prompts, rewarded by `data.reward`."""
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    config_cls, trainer_cls = (RLOOConfig, RLOOTrainer) if algorithm == "rloo" else (GRPOConfig, GRPOTrainer)
    prompts, reward = data.prompt_set(algorithm), data.reward_func(algorithm)
    model, tokenizer, path, observers = _setup(params, run, algorithm)
    # Sampling wants left padding; the saved model keeps the tokenizer as loaded.
    sampling_tokenizer = load_tokenizer(path, padding_side="left")
    from_vllm = params.rollout_engine == "vllm"
    rollouts: dict[str, Any] = {}
    engine: Any = nullcontext()
    if from_vllm:
        from tuneloop.trainer.vllm_generator import kv_cache_bytes

        prompt_ids = [prompt_token_ids(sampling_tokenizer, p) for p in prompts]
        longest_prompt = max(map(len, prompt_ids))
        longest = longest_prompt + params.max_completion_length
        rollouts = vllm_rollouts.trl_rollout_args(path, longest_prompt, params.max_completion_length)
        # One step's sequences at once: every process samples its batch's groups.
        sequences = params.per_device_train_batch_size * params.gradient_accumulation_steps
        engine = vllm_rollouts.engine_options(
            "bfloat16" if params.bf16 else "float32", kv_cache_bytes(path, sequences * longest, longest)
        )
    args = trl_args(
        config_cls,
        params,
        run.output_dir,
        beta=params.beta,
        epsilon=params.epsilon,
        num_generations=params.num_generations,
        max_completion_length=params.max_completion_length,
        temperature=params.temperature,
        **rollouts,
    )
    with engine:
        trainer = _trainer(trainer_cls, params, model, args, prompt_dataset(prompts), sampling_tokenizer, observers,
                           reward_funcs=reward)
    if from_vllm and args.use_vllm and args.vllm_mode == "colocate":
        vllm_rollouts.InPlacePush(trainer, prompt_ids[0], params.max_rollout_logprob_gap)
    return _train(algorithm, trainer, tokenizer, run, observers)


def prompt_token_ids(tokenizer: Any, prompt: Messages) -> list[int]:
    """A prompt's token ids as sampling sees them (through the chat template)."""
    return list(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])


def online_rl_data(config: OnlineRLStageConfig | PPOStageConfig) -> StageData:
    """An online RL stage config's prompts file and reward function (RLOO, GRPO and PPO)."""
    return StageData(prompts=prompt_rows(config.prompts), reward=reward_function(config.reward, config.registry_root))


def run_online_rl(algorithm: Algorithm, config: OnlineRLStageConfig, *, resume: bool = False) -> StageResult:
    return run_online_rl_on(algorithm, config, online_rl_data(config), StageRun.of(config, resume))


run_rloo = partial(run_online_rl, "rloo")
run_grpo = partial(run_online_rl, "grpo")
run_rloo_on = partial(run_online_rl_on, "rloo")
run_grpo_on = partial(run_online_rl_on, "grpo")
