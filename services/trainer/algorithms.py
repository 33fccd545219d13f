"""The training stages by name: each algorithm once, with its config, its run function and
its one-line help.

`tuneloop train NAME` is made from this table (cli.py), and so is retrain's choice of
`algorithm:` (retrain.py): a policy algorithm also names its section's params class and the
function the pipeline trains with, `(params, StageData, StageRun) -> StageResult`, the one
its own stage runs. Every run returns a `stages.StageResult`.

Run functions are named as `module:function` and imported when called: the command line
lists the stages without loading torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, get_args

from pydantic import BaseModel

from tuneloop.trainer.config import (
    ConfigError,
    DPOParams,
    DPOStageConfig,
    OnlineRLParams,
    OnlineRLStageConfig,
    PPOParams,
    PPOStageConfig,
    SFTStageConfig,
)
from tuneloop.trainer.reward_stage import RewardStageConfig

if TYPE_CHECKING:
    from tuneloop.trainer.stages import StageData, StageResult, StageRun

# retrain's `algorithm:` values: the algorithms below with a `train` function.
PolicyAlgorithm = Literal["dpo", "ppo", "rloo", "grpo"]


def _imported(ref: str) -> Callable[..., StageResult]:
    module, _, name = ref.partition(":")

    def call(*args: Any, **kwargs: Any) -> StageResult:
        return getattr(importlib.import_module(module), name)(*args, **kwargs)

    call.__qualname__ = call.__name__ = name
    call.__doc__ = f"{ref}, imported when called."
    return call


@dataclass(frozen=True)
class Algorithm:
    name: str
    help: str
    config: type[BaseModel]  # `tuneloop train NAME --config FILE`
    run: Callable[..., StageResult]  # (config, *, resume) when resumable, else (config)
    resumable: bool = True  # takes --resume: continues from output_dir's last checkpoint
    params: type[BaseModel] | None = None  # retrain's section of the same name (policy algorithms)
    train: Callable[[Any, StageData, StageRun], StageResult] | None = None  # what retrain calls
    needs_reward: bool = False  # trains against a reward function (retrain refuses it when the reward gate fails)

    def run_stage(self, config: BaseModel, resume: bool = False) -> StageResult:
        return self.run(config, resume=resume) if self.resumable else self.run(config)


ALGORITHMS: dict[str, Algorithm] = {}


def register(algorithm: Algorithm) -> Algorithm:
    if algorithm.name in ALGORITHMS:
        raise ValueError(f"algorithm {algorithm.name!r} is registered twice")
    if (algorithm.params is None) != (algorithm.train is None):
        raise ValueError(f"algorithm {algorithm.name!r}: a policy algorithm has both params and train")
    ALGORITHMS[algorithm.name] = algorithm
    return algorithm


def get(name: str) -> Algorithm:
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise ConfigError(f"unknown algorithm {name!r}; known: {', '.join(ALGORITHMS)}") from None


def policy_algorithms() -> list[Algorithm]:
    """Those retrain can train the policy with."""
    return [a for a in ALGORITHMS.values() if a.train is not None]


register(Algorithm(
    "sft", "Supervised fine-tuning on (prompt, ideal reply) conversations.",
    SFTStageConfig, _imported("tuneloop.trainer.stages:run_sft"),
))
register(Algorithm(
    "dpo", "Direct preference optimisation on a preference-store snapshot (or a file).",
    DPOStageConfig, _imported("tuneloop.trainer.stages:run_dpo"),
    params=DPOParams, train=_imported("tuneloop.trainer.stages:run_dpo_on"),
))
register(Algorithm(
    "ppo", "Classic PPO: value head, per-token KL penalty, GAE, clipped losses.",
    PPOStageConfig, _imported("tuneloop.trainer.ppo:run_ppo"),
    params=PPOParams, train=_imported("tuneloop.trainer.ppo:run_ppo_on"),
    needs_reward=True,
))
register(Algorithm(
    "rloo", "RLOO (TRL): group samples per prompt, leave-one-out baseline, KL to the reference.",
    OnlineRLStageConfig, _imported("tuneloop.trainer.stages:run_rloo"),
    params=OnlineRLParams, train=_imported("tuneloop.trainer.stages:run_rloo_on"), needs_reward=True,
))
register(Algorithm(
    "grpo", "GRPO (TRL): group samples per prompt, group-normalised advantages.",
    OnlineRLStageConfig, _imported("tuneloop.trainer.stages:run_grpo"),
    params=OnlineRLParams, train=_imported("tuneloop.trainer.stages:run_grpo_on"), needs_reward=True,
))
register(Algorithm(
    "reward", "Reward model (Bradley–Terry) with its held-out gate; registered, promoted if it passes.",
    RewardStageConfig, _imported("tuneloop.trainer.reward_stage:run"), resumable=False,
))

# RetrainConfig's `algorithm` is typed by the Literal (its schema lists the values); the two
# must name the same algorithms.
if set(get_args(PolicyAlgorithm)) != {a.name for a in policy_algorithms()}:
    raise RuntimeError("PolicyAlgorithm and the registered policy algorithms differ")
