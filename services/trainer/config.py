"""One typed, documented config per training stage.

A stage reads a YAML file plus `--set key=value` overrides (dotted keys reach nested
fields: `--set lora.r=8`). Unknown or invalid fields fail before anything loads, with the
field named. Fields left unset that depend on the hardware (`bf16`, `gradient_checkpointing`,
`optim`) are filled from the device: TRL's own defaults (bf16, checkpointing, a fused
optimizer) fail on a CPU.

The `*Params` classes hold what a stage needs to train (`DeviceParams`, what every trained
stage shares, under them all); the `*StageConfig` classes add where the model and data come
from. `retrain` embeds the `*Params` and supplies the rest. The reward stage's classes are
beside it (reward_stage.py); `algorithms.py` names each stage's config class.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class ConfigError(ValueError):
    """A stage config is invalid; the message names each bad field."""


class TrainerSettings(BaseSettings):
    """Process-wide trainer settings from the environment (TUNELOOP_TRAINER_*)."""

    model_config = SettingsConfigDict(env_prefix="TUNELOOP_TRAINER_", extra="ignore")

    runs_dir: Path = Field(Path(".tuneloop/runs"), description="Folder that holds one folder per retrain run.")
    pushgateway: str | None = Field(
        None,
        description="Prometheus Pushgateway URL (host:port or http://...); a Job is gone before a scrape, so "
        "gauges are pushed after every logged step. Unset: only the textfile in the run dir is written.",
    )
    prom_textfile: Path | None = Field(
        None,
        description="Extra path to write the gauges to after every step, e.g. a node-exporter textfile "
        "collector folder's `tuneloop_trainer.prom`.",
    )
    torch_threads: int | None = Field(
        None,
        ge=1,
        description="CPU threads for torch; unset: one per core. On a CPU node shared with other work, fewer "
        "threads avoid OpenMP waits that slowed a tiny model's steps 100-fold in our measurements.",
    )
    # Where the retrain's training stage runs (distributed.py): retrain itself stays one process
    # and starts the stage under torchrun on processes_per_node x nodes processes.
    processes_per_node: int = Field(
        1, ge=1, description="Training processes per node (one per GPU) for retrain's training stage."
    )
    nodes: int = Field(
        1,
        ge=1,
        description="Nodes (pods) retrain's training stage runs on; above 1 every node runs `retrain` and "
        "they meet at rendezvous_endpoint (torchrun c10d). The chart makes them an Indexed Job.",
    )
    node_rank: int = Field(
        0,
        ge=0,
        description="This node's index (the Indexed Job's completion index): node 0 runs the pipeline "
        "and hosts the rendezvous; the others join its training stage only.",
    )
    rendezvous_endpoint: str | None = Field(
        None, description="host:port of node 0's c10d rendezvous (needed when nodes > 1)."
    )
    rendezvous_id: str | None = Field(
        None, description="Rendezvous id shared by the nodes of one run; unset: the Job's name."
    )
    local_addr: str | None = Field(
        None, description="Address the other nodes reach this one at (the pod IP); unset: the host's FQDN."
    )

    @model_validator(mode="after")
    def _nodes_fit(self) -> TrainerSettings:
        if self.node_rank >= self.nodes:
            raise ValueError(f"node_rank {self.node_rank} must be below nodes ({self.nodes})")
        if self.nodes > 1 and not self.rendezvous_endpoint:
            raise ValueError("nodes > 1 needs rendezvous_endpoint (host:port of node 0)")
        return self

    @property
    def processes(self) -> int:
        return self.processes_per_node * self.nodes


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class LoraParams(Strict):
    enabled: bool = Field(False, description="Train LoRA adapters instead of all weights; merged into the saved model.")
    r: int = Field(16, ge=1, description="Adapter rank.")
    alpha: int = Field(32, ge=1, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the adapter input.")
    target_modules: list[str] | str = Field(
        "all-linear", description="Module names to adapt, or 'all-linear' for every linear layer but the head."
    )


class WatchParams(Strict):
    """The reward-hacking watch (trainer/watch.py)."""

    eval_every: int = Field(0, ge=0, description="Measure the eval metric every this many steps (0: bounds only).")
    criteria: Path | None = Field(
        None, description="Criteria file whose behaviour checks and probes make the eval metric; retrain: its own."
    )
    eval_prompts: int = Field(8, ge=1, description="Held-out prompts (from the criteria) answered per measurement.")
    window: int = Field(
        3, ge=2, description="Measurements looked back over: flag when reward is above and eval below the best of them."
    )
    min_change: float = Field(0.0, ge=0, description="Changes of at most this size count as flat.")
    max_kl: float | None = Field(None, gt=0, description="Flag when the logged KL to the reference exceeds this.")
    length_ratio: tuple[float, float] | None = Field(
        None, description="Flag when the response length over the first step's leaves [min, max]."
    )
    stop: bool = Field(False, description="Stop the stage at the first flag (its model is then judged as usual).")


class DeviceParams(Strict):
    """How any trained stage uses its device: LoRA, precision, activation checkpointing, the
    optimizer, and TRL fields passed through (modeling.trl_args)."""

    lora: LoraParams = Field(default_factory=LoraParams, description="LoRA adapters (peft).")
    bf16: bool | None = Field(None, description="bf16 mixed precision; unset: on for a bf16-capable GPU, off on CPU.")
    gradient_checkpointing: bool | None = Field(
        None, description="Recompute activations to save memory; unset: on for GPU, off on CPU."
    )
    optim: str | None = Field(None, description="Optimizer name; unset: adamw_torch_fused on GPU, adamw_torch on CPU.")
    trl_args: dict[str, Any] = Field(
        default_factory=dict, description="Further TRL/transformers config fields, passed through as given."
    )

    @model_validator(mode="after")
    def _device_defaults(self) -> DeviceParams:
        import torch

        gpu = torch.cuda.is_available()
        if self.bf16 is None:
            self.bf16 = gpu and torch.cuda.is_bf16_supported()
        if self.gradient_checkpointing is None:
            self.gradient_checkpointing = gpu
        if self.optim is None:
            self.optim = "adamw_torch_fused" if gpu else "adamw_torch"
        return self


class TrainParams(DeviceParams):
    """What every policy stage shares: optimisation, checkpoints, the hacking watch."""

    seed: int = Field(0, description="Seed for data order, sampling and new weights.")
    max_steps: int = Field(100, ge=1, description="Optimizer steps to run.")
    learning_rate: float = Field(1e-5, gt=0, description="Peak learning rate.")
    lr_scheduler_type: str = Field("linear", description="transformers scheduler name (linear, cosine, constant).")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps.")
    per_device_train_batch_size: int = Field(4, ge=1, description="Examples per device per micro-step.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-steps per optimizer step.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    logging_steps: int = Field(1, ge=1, description="Log metrics every this many steps.")
    save_steps: int = Field(50, ge=1, description="Write a resumable checkpoint every this many steps.")
    save_total_limit: int = Field(2, ge=1, description="Checkpoints kept; older ones are deleted.")
    watch: WatchParams = Field(default_factory=WatchParams, description="Reward-hacking watch while training.")


class SFTParams(TrainParams):
    learning_rate: float = Field(2e-5, gt=0, description="Peak learning rate.")
    max_length: int = Field(1024, ge=8, description="Tokens per example (prompt + response); longer are truncated.")
    completion_only_loss: bool = Field(True, description="Train on the response tokens only, not the prompt.")


DPOLoss = Literal[
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
    "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
]  # fmt: skip


class ReplayParams(Strict):
    """Replay against forgetting (replay.py): the parent's own greedy answers to general
    prompts, kept by an NLL term beside the preference loss."""

    prompts: Path | None = Field(
        None,
        description="JSONL of general prompts, one {'prompt': str} or {'messages': [...]} per line; the parent "
        "answers each once before training (greedy, its chat template; kept in output_dir/replay_answers.jsonl, "
        "reused on resume) and the loss becomes DPO loss + weight x mean token NLL of the policy on (prompt, "
        "parent's answer). Never the criteria's held-out prompts or probes: a prompt equal to one is refused. "
        "Unset: no replay.",
    )
    weight: float = Field(
        1.0,
        ge=0,
        description="Weight of the replay NLL beside the preference loss. 0: the NLL is only measured and logged "
        "(replay_nll), a gauge of forgetting that does not train.",
    )
    max_new_tokens: int = Field(128, ge=1, description="Most greedy tokens of each parent answer.")
    batch_size: int = Field(
        4, ge=1, description="Replay rows drawn (seeded by seed and step) per device per micro-step."
    )


class DPOParams(TrainParams):
    learning_rate: float = Field(1e-6, gt=0, description="Peak learning rate (DPO wants small ones on full models).")
    beta: float = Field(0.1, gt=0, description="Strength of the implicit KL to the reference model.")
    loss_type: DPOLoss | list[DPOLoss] = Field("sigmoid", description="DPO loss (sigmoid = the paper's), or several.")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="Assumed label-flip rate (robust/cDPO).")
    max_length: int = Field(1024, ge=8, description="Tokens per prompt + response; longer are truncated.")
    reference: str | None = Field(
        None,
        description="Reference model (folder or registry ref); unset: a frozen copy of the starting model "
        "(with LoRA: the base model with adapters off).",
    )
    replay: ReplayParams = Field(
        default_factory=ReplayParams,
        description="Replay of the parent's answers to general prompts (an NLL term against forgetting); off "
        "unless replay.prompts is set.",
    )


class RewardSource(Strict):
    """Where online RL gets its rewards: exactly one of `model` and `target`."""

    model: str | None = Field(None, description="Local reward model: a folder or a registry ref (reward@production).")
    target: str | None = Field(None, description="host:port of a tuneloop Reward service to score remotely.")
    batch_size: int = Field(16, ge=1, description="Pairs per scoring call of a local reward model.")

    @model_validator(mode="after")
    def _one(self) -> RewardSource:
        if (self.model is None) == (self.target is None):
            raise ValueError("set exactly one of reward.model and reward.target")
        return self


class RolloutEngineParams(Strict):
    """What samples an online-RL stage's responses."""

    rollout_engine: Literal["transformers", "vllm"] = Field(
        "transformers",
        description="'transformers': generate on the trained model. 'vllm': an engine in each training process, "
        "in the trainer's dtype; the trained weights are pushed into it in place (no files) before every "
        "step's sampling, and its log-probabilities of what it sampled are checked against the trained model's.",
    )
    max_rollout_logprob_gap: float | None = Field(
        5e-3,
        gt=0,
        description="rollout_engine vllm: the largest |log p_vLLM - log p_trained| (nats) on sampled tokens before "
        "the run stops (fp32 engines agree to ~1e-5; stale weights or another dtype differ by 1e-2 and more). "
        "null: only log it (rollout_logprob_gap), e.g. for bf16 engines.",
    )


class OnlineRLParams(RolloutEngineParams, TrainParams):
    """RLOO and GRPO (TRL): sample a group per prompt, score, baseline within the group."""

    learning_rate: float = Field(1e-6, gt=0, description="Peak learning rate.")
    beta: float = Field(0.05, ge=0, description="KL coefficient against the reference model (0: no reference).")
    epsilon: float = Field(0.2, gt=0, description="Clipping range of the importance ratio.")
    num_generations: int = Field(4, ge=2, description="Completions sampled per prompt (the group).")
    max_completion_length: int = Field(64, ge=1, description="Most tokens sampled per completion.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature.")

    @model_validator(mode="after")
    def _groups_fit(self) -> OnlineRLParams:
        batch = self.per_device_train_batch_size * self.gradient_accumulation_steps
        if batch % self.num_generations:
            raise ValueError(
                f"per_device_train_batch_size * gradient_accumulation_steps ({batch}) must be a multiple of "
                f"num_generations ({self.num_generations})"
            )
        return self


class KLParams(Strict):
    init_coef: float = Field(0.05, ge=0, description="Starting KL coefficient (beta).")
    adaptive: bool = Field(False, description="Steer the coefficient towards `target` (Ziegler et al. 2019).")
    target: float = Field(6.0, gt=0, description="Target KL per response (nats), adaptive controller only.")
    horizon: float = Field(10000, gt=0, description="Samples over which the controller closes the gap.")
    estimator: Literal["k1", "k3"] = Field("k1", description="Per-token KL estimator (k1 = log ratio, k3 >= 0).")
    clip: float = Field(
        10.0,
        gt=0,
        description="k3 only: bound (nats) of the log ratio and of each token's estimate. k3 grows like "
        "exp(log ratio), so without a bound one sampled tail token can outweigh a batch of scores.",
    )


_RETIRED_PPO_FIELDS = (
    ("top_k", (0, None), "PPO samples from the full softmax that its loss and KL score"),
    ("top_p", (1, 1.0, None), "PPO samples from the full softmax that its loss and KL score"),
    ("whiten_rewards", (False, None), "use reward_normalization ('running' statistics over the whole run)"),
)


class PPOParams(RolloutEngineParams, TrainParams):
    """Classic RLHF PPO: policy with a value head, per-token KL penalty, GAE, clipped losses.

    One step samples `rollout_batch_size` responses (shared evenly by the training processes),
    then makes `ppo_epochs` passes over them in optimizer updates of
    per_device_train_batch_size * gradient_accumulation_steps rows per process.
    """

    learning_rate: float = Field(1e-6, gt=0, description="Peak learning rate.")
    rollout_batch_size: int = Field(8, ge=1, description="Prompts sampled per PPO step.")
    ppo_epochs: int = Field(4, ge=1, description="Passes over each rollout batch.")
    gamma: float = Field(1.0, ge=0, le=1, description="Discount.")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda.")
    cliprange: float = Field(0.2, gt=0, description="Policy ratio clip.")
    cliprange_value: float = Field(0.2, gt=0, description="Value prediction clip around the rollout's values.")
    vf_coef: float = Field(0.1, ge=0, description="Weight of the value loss.")
    reward_normalization: Literal["running", "none"] = Field(
        "running",
        description="'running': scores become (score - mean) / std over every rollout of the run so far, so "
        "beta, the KL target and cliprange_value mean the same whatever the reward model's scale; the "
        "statistics are checkpointed. 'none': raw scores (only for a reward already on a unit scale).",
    )
    reward_clip: float | None = Field(
        5.0, gt=0, description="Normalised scores are kept within [-reward_clip, reward_clip] (null: no bound)."
    )
    kl: KLParams = Field(default_factory=KLParams, description="KL penalty against the frozen reference.")
    max_prompt_length: int = Field(512, ge=8, description="Prompt tokens kept (from the end).")
    max_new_tokens: int = Field(64, ge=1, description="Most tokens sampled per response.")
    temperature: float = Field(
        1.0,
        gt=0,
        description="Sampling temperature, the only sampling knob: responses are drawn from softmax(logits / "
        "temperature), the distribution the loss and the KL score (no top-k/top-p, no repetition penalty, "
        "the model's generation_config.json ignored).",
    )
    missing_eos_penalty: float | None = Field(
        None,
        description="Subtracted from the score of a response cut at max_new_tokens (discourages rambling); "
        "in units of the normalised score when reward_normalization is 'running'.",
    )
    reference: str | None = Field(
        None,
        description="Reference model; unset: a frozen copy of the starting model (with LoRA: adapters off).",
    )

    @model_validator(mode="before")
    @classmethod
    def _retired_fields(cls, data: Any) -> Any:
        # Configs saved by earlier runs (retrain's config.yaml) carry these at their old
        # defaults, which is what PPO does now; any other value would be silently changed.
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for name, neutral, why in _RETIRED_PPO_FIELDS:
            if name in data and data.pop(name) not in neutral:
                raise ValueError(f"{name}: no longer supported; {why}")
        return data

    @model_validator(mode="after")
    def _batches_fit(self) -> PPOParams:
        update = self.per_device_train_batch_size * self.gradient_accumulation_steps
        if self.rollout_batch_size % update:
            raise ValueError(
                f"rollout_batch_size ({self.rollout_batch_size}) must be a multiple of "
                f"per_device_train_batch_size * gradient_accumulation_steps ({update})"
            )
        if self.optim not in ("adamw_torch", "adamw_torch_fused"):
            raise ValueError(f"optim {self.optim!r}: PPO supports adamw_torch and adamw_torch_fused")
        if self.trl_args:
            raise ValueError("trl_args: PPO is not a TRL trainer; set its fields directly")
        return self


class PreferenceSource(Strict):
    """Preference pairs: a snapshot of the preference store, or a file (exactly one)."""

    store_root: str | None = Field(
        None, description="Preference store root: a folder or an object-storage URL (s3://bucket/prefix)."
    )
    snapshot: str = Field(
        "latest", pattern=r"^(latest|pairs@\d+)$", description="Store snapshot to train on: pairs@<version>, or 'latest'."
    )
    path: Path | None = Field(
        None,
        description="Preference rows with prompt/chosen/rejected (strings or chat messages): JSON lines, Parquet "
        "(.parquet), CSV (.csv) or a saved HF dataset folder.",
    )
    tenants: list[Annotated[str, Field(min_length=1)]] = Field(
        default_factory=list,
        description="The tenants whose preferences the run may use (required with store_root: there is no "
        "implicit 'all'). Only their rows are trained on, and the agreement gates must hold for each of them.",
    )
    max_tenant_share: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Most share of the run's rows any one tenant may have (null: no cap). A tenant above it "
        "keeps its latest rows up to the level where no tenant exceeds the share; with one tenant it has "
        "no effect.",
    )
    tie_policy: Literal["drop"] = Field(
        "drop",
        description="Ties in policy training: 'drop', the only rule. A tie names no better answer, and DPO's loss "
        "(like the prompt set online RL takes from the pairs) reads only pairs that do. The reward model can "
        "learn from ties: its `ties: symmetric`.",
    )
    both_bad_policy: Literal["drop"] = Field(
        "drop", description="'Both bad' judgements in policy training: 'drop', the only rule (as tie_policy)."
    )
    honour_weight: bool = Field(
        True,
        description="Draw rows in proportion to their `weight` column (the store's end_user_weight for end "
        "users' feedback, 1 for annotators'; a file's own column) in DPO and the reward model: TRL has no "
        "per-row loss weight, so a row of weight 2 is drawn twice as often as one of 1, and one of 0 never. "
        "False: every row counts alike.",
    )
    cut_answers: Literal["drop", "keep", "drop_if_chosen_cut"] = Field(
        "drop",
        description="Pairs with an answer cut at the token limit (the store's chosen_cut/rejected_cut, from the "
        "completion's finish_reason 'length'; a file's own columns), in policy training: 'drop' leaves out a "
        "pair where either answer was cut, 'drop_if_chosen_cut' only one whose chosen answer was cut, 'keep' "
        "trains on all. Such pairs teach the length at which answers stop rather than the preference. Pairs "
        "whose answers did not say (rows stored before the store kept it, files without the columns) are kept.",
    )
    max_pairs_per_prompt: int | None = Field(
        None,
        ge=1,
        description="At most this many pairs of one prompt in policy training (null: no cap), so a few prompts "
        "judged many times do not dominate. Which pairs stay is drawn with the training's seed, the same for "
        "the same snapshot and seed; applied after ties, both-bad and cut pairs are left out.",
    )

    @field_validator("store_root", mode="before")
    @classmethod
    def _root_as_text(cls, value: object) -> object:
        return os.fspath(value) if isinstance(value, os.PathLike) else value

    @field_validator("tie_policy", "both_bad_policy", mode="before")
    @classmethod
    def _only_drop(cls, value: object) -> object:
        # The store's export can keep these rows (label tie/both_bad), but a trainer that
        # cannot read the label would treat the order shown as a preference.
        if value != "drop":
            raise ValueError(
                f"{value!r} is not supported: DPO and online RL train on preference pairs only, so kept rows would "
                "be dropped anyway; use 'drop' (the reward model's `ties`/`both_bad: symmetric` learn from them)"
            )
        return value

    @model_validator(mode="after")
    def _one(self) -> PreferenceSource:
        if (self.store_root is None) == (self.path is None):
            raise ValueError("set exactly one of store_root and path")
        if self.store_root is not None and not self.tenants:
            raise ValueError("tenants: name the tenants whose preferences this run may use")
        return self


class MetricsParams(Strict):
    pushgateway: str | None = Field(
        None, description="Prometheus Pushgateway URL; unset: TUNELOOP_TRAINER_PUSHGATEWAY, else no push."
    )
    textfile: Path | None = Field(
        None, description="Extra Prometheus textfile rewritten after every step; unset: TUNELOOP_TRAINER_PROM_TEXTFILE."
    )
    run_label: str | None = Field(None, description="Value of the gauges' `run` label; unset: the output folder's name.")


class StageBase(Strict):
    model: str = Field(description="Starting policy: a model folder or a registry ref (policy@production).")
    output_dir: Path = Field(description="Run folder: checkpoints, metrics.jsonl, and the final model in model/.")
    registry_root: Path | None = Field(
        None, description="Registry to resolve refs against; default TUNELOOP_REGISTRY_ROOT."
    )
    metrics: MetricsParams = Field(default_factory=MetricsParams, description="Where step gauges go.")


class SFTStageConfig(SFTParams, StageBase):
    data: Path = Field(description="JSONL: one {'messages': [...]} per line; the last message is the ideal reply.")


class DPOStageConfig(DPOParams, StageBase):
    preferences: PreferenceSource = Field(description="Preference pairs to train on.")


class OnlineRLStageConfig(OnlineRLParams, StageBase):
    prompts: Path = Field(description="JSONL: one {'prompt': str} or {'messages': [...]} per line.")
    reward: RewardSource = Field(description="Reward function: local model or the Reward service.")


class PPOStageConfig(PPOParams, StageBase):
    prompts: Path = Field(description="JSONL: one {'prompt': str} or {'messages': [...]} per line.")
    reward: RewardSource = Field(description="Reward function: local model or the Reward service.")


# ---- loading ---------------------------------------------------------------------------

C = TypeVar("C", bound=BaseModel)


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`a.b=1` -> {'a': {'b': 1}}; values are YAML scalars (numbers, booleans, lists, null)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {pair!r}: expected key=value")
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {pair!r}: {part} is both a value and a section")
            node = child
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
    return out


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def format_errors(err: ValidationError, prefix: str = "") -> str:
    lines = []
    for e in err.errors():
        field = prefix + ".".join(str(p) for p in e["loc"]) or "(config)"
        lines.append(f"{field}: {e['msg']}")
    return "; ".join(lines)


def build(cls: type[C], data: dict[str, Any]) -> C:
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"invalid {cls.__name__}: {format_errors(err)}") from None


def load_config(cls: type[C], path: Path | None, overrides: list[str] | None = None) -> C:
    """The config of `cls` from a YAML file (optional) plus `key=value` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of fields")
        data = loaded
    return build(cls, deep_merge(data, parse_overrides(overrides or [])))
