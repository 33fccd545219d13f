"""The scheduled retrain pipeline: preferences in, a gated candidate out.

    snapshot the preference store
      -> gates: enough new pairs since production's snapshot; annotator agreement (kappa,
         percent agreement) and anchor accuracy above their bars
      -> the pairs to train on (data.training_rows: ties, cut answers and per-prompt caps
         left out), summarised in the report's "Training data"
      -> optional reward-model retrain, with its own held-out gate (reward_stage)
      -> evaluate the production policy (the parent) on the declared criteria
      -> DPO (default), PPO, RLOO or GRPO from the parent
      -> evaluate the candidate; compare with the parent criterion by criterion
      -> register the candidate (always, with its card), promote it to `production` only
         when every criterion holds and production is still the parent

Everything a run makes stays in its run folder: config.yaml, the criteria file as
declared (criteria.yaml, its SHA-256 in state.json), state.json (each finished step and its
outcome), the training stage's checkpoints and metrics, eval_before.json, eval_after.json,
verdict.json, report.json, report.md (with every held-out answer and probe of parent and
candidate side by side), answers.json (the same pairs as data) and plots (checkpoints.png
when several checkpoints were evaluated). `production` changes in one place only, the
last step, so a failed or killed run never changes what is served. A run resumes from its
folder: finished steps are skipped, training continues from its last checkpoint, the same
snapshot and the same criteria (a changed criteria file fails the resume).

The training stage can run on several processes and nodes (TrainerSettings.processes_per_node,
.nodes): the pipeline stays in this one process and starts the stage under torchrun
(`retrain-stage RUN_DIR` in every training process), then reads rank 0's stage.json. On
several nodes, node 0 runs the pipeline; the others only join its training stage (`follow`).

Outcomes: "promoted"; "refused" (a gate or a criterion said no — a normal result, exit code
0); "failed" (an error — non-zero exit code).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
import time
import uuid
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, WithJsonSchema

from tuneloop.common.durable import file_sha256, write_atomic
from tuneloop.common.registry import Registry
from tuneloop.trainer import algorithms
from tuneloop.trainer import criteria as cr
from tuneloop.trainer import selection
from tuneloop.trainer.algorithms import PolicyAlgorithm
from tuneloop.trainer.config import (
    ConfigError,
    DPOParams,
    MetricsParams,
    OnlineRLParams,
    PPOParams,
    PreferenceSource,
    Strict,
    TrainerSettings,
    build,
)
from tuneloop.trainer.data import NoTrainingPairs, PreferenceData, load_preferences, to_dpo_dataset
from tuneloop.trainer.replay import check_replay
from tuneloop.trainer.distributed import launch_command, world_size
from tuneloop.trainer.jobs import JOB_NAME_ENV, record_promoted_version
from tuneloop.trainer.modeling import FINAL_DIR, registry
from tuneloop.trainer.report import write_report
from tuneloop.trainer.reward_stage import RewardModelParams, RewardStageConfig
from tuneloop.trainer.stages import STAGE_FILE

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
CONFIG_FILE = "config.yaml"
CRITERIA_FILE = "criteria.yaml"
TRAIN_DIR = "train"
CANDIDATES_DIR = "candidates"  # checkpoints made plain model folders (selection.materialise)
# How often a node other than 0 looks at the run's state for a training stage to join.
FOLLOW_POLL_S = 1.0

# RewardStageConfig fields the pipeline fills in itself: its data (the run's pinned snapshot),
# the registry and name, honour_weight (preferences'). `reward_model` cannot hold them.
_REWARD_OWNED = tuple(f for f in RewardStageConfig.model_fields if f not in RewardModelParams.model_fields)

Status = Literal["running", "promoted", "refused", "failed"]


class GateParams(Strict):
    min_new_pairs: int = Field(64, ge=0, description="Preference pairs newer than production's snapshot needed to train.")
    min_agreement: float | None = Field(
        0.65, ge=0, le=1, description="Percent agreement among annotators on shared items; unset: not gated."
    )
    min_kappa: float | None = Field(0.4, ge=-1, le=1, description="Cohen's/Fleiss' kappa; unset: not gated.")
    min_anchor_accuracy: float | None = Field(
        0.8, ge=0, le=1, description="Annotators' accuracy on anchor items (pooled); unset: not gated."
    )
    allow_unmeasured: bool = Field(
        False,
        description="Pass agreement gates that cannot be measured (no item judged twice, no anchors) "
        "instead of refusing the run.",
    )


class RetrainConfig(Strict):
    """The scheduled pipeline's config (YAML; see examples/retrain.yaml)."""

    policy_name: str = Field("policy", description="Registry name of the policy; its `production` is the parent.")
    reward_name: str = Field("reward", description="Registry name of the reward model.")
    registry_root: Path | None = Field(None, description="Registry folder; default TUNELOOP_REGISTRY_ROOT.")
    runs_dir: Path | None = Field(None, description="Where run folders go; default TUNELOOP_TRAINER_RUNS_DIR.")
    preferences: PreferenceSource = Field(description="Preference store (or file) to snapshot and train on.")
    criteria: Path = Field(description="Success criteria file, declared for this run (copied and hashed at start).")
    algorithm: PolicyAlgorithm = Field("dpo", description="Policy training algorithm (its section holds its params).")
    dpo: DPOParams = Field(default_factory=DPOParams, description="DPO parameters (algorithm: dpo).")
    ppo: PPOParams = Field(default_factory=PPOParams, description="PPO parameters (algorithm: ppo).")
    rloo: OnlineRLParams = Field(default_factory=OnlineRLParams, description="RLOO parameters (algorithm: rloo).")
    grpo: OnlineRLParams = Field(default_factory=OnlineRLParams, description="GRPO parameters (algorithm: grpo).")
    gates: GateParams = Field(default_factory=GateParams, description="Data and annotation-quality gates.")
    # The chart's schema spells this out from RewardStageConfig less _REWARD_OWNED
    # (scripts/gen_chart_schema.py), so here it is an object.
    reward_model: Annotated[RewardModelParams, WithJsonSchema({"type": "object"})] | None = Field(
        None,
        description="Retrain the reward model first: RewardStageConfig fields (base_model defaults to "
        "<reward_name>@production); data, snapshot and registry come from this config. Unset: skip.",
    )
    reward_target: str | None = Field(
        None,
        description="host:port of the Reward service for online RL and the win-rate criterion; unset: the "
        "registry's <reward_name>@production scored locally (if there is one).",
    )
    kafka_bootstrap_servers: str | None = Field(
        default_factory=lambda: os.environ.get("TUNELOOP_KAFKA_BOOTSTRAP_SERVERS"),
        description="Publish ModelEvents to tuneloop.models.v1 on promotion; default "
        "TUNELOOP_KAFKA_BOOTSTRAP_SERVERS; unset: no events (services still poll the registry).",
    )
    metrics: MetricsParams = Field(default_factory=MetricsParams, description="Where training gauges go.")
    select_checkpoints: int = Field(
        1,
        ge=1,
        description="Candidates evaluated on the criteria: the final model and the newest kept checkpoints "
        "before it (1: the final model only). The one passing every criterion with the most progress on the "
        "behaviour is registered; with none passing the run is refused, listing each one's failures. The "
        "stage keeps save_total_limit checkpoints, written every save_steps.",
    )

    def reward_stage_config(self, snapshot: str, work_dir: Path) -> RewardStageConfig:
        """The reward stage's config: `reward_model` plus what the pipeline owns."""
        params = self.reward_model
        if params is None:
            raise ConfigError("reward_model is not set")
        source = self.preferences
        data: dict[str, Any] = (
            {"store_root": source.store_root, "snapshot": snapshot, "tenants": source.tenants,
             "max_tenant_share": source.max_tenant_share}
            if source.store_root is not None
            else {"dataset_path": source.path}
        )
        return build(RewardStageConfig, {
            **params.model_dump(exclude={"base_model", "work_dir"}),
            "base_model": params.base_model or f"{self.reward_name}@production",
            "work_dir": params.work_dir or work_dir,
            "registry_root": self.registry_root,
            "name": self.reward_name,
            "honour_weight": source.honour_weight,
            **data,
        })

    def params(self) -> DPOParams | PPOParams | OnlineRLParams:
        return getattr(self, self.algorithm)


# ---- run folder and its state ------------------------------------------------------------


class Run:
    """A run folder and its state.json (rewritten atomically after every step)."""

    def __init__(self, run_dir: Path, config: RetrainConfig, state: dict[str, Any]) -> None:
        self.dir = run_dir
        self.config = config
        self.state = state

    @classmethod
    def create(cls, config: RetrainConfig, reg: Registry) -> Run:
        parent_version = reg.current(config.policy_name, "production")
        if parent_version is None:
            raise ConfigError(f"{config.policy_name}@production is not set: nothing to start from")
        criteria = cr.load_criteria(config.criteria)  # invalid criteria fail before any work
        check_replay(config.params(), config.criteria)  # a replay prompt that is a probe, too
        run_id = job_run_id() or f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"
        run_dir = runs_dir(config) / run_id
        run_dir.mkdir(parents=True)
        shutil.copyfile(config.criteria, run_dir / CRITERIA_FILE)
        write_atomic(run_dir / CONFIG_FILE, yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False).encode())
        run = cls(
            run_dir,
            config,
            {
                "run_id": run_id,
                "status": "running",
                "started_at": datetime.now(UTC).isoformat(),
                "algorithm": config.algorithm,
                # The concrete version: a resumed run continues from the same parent.
                "parent": f"{config.policy_name}@{parent_version}",
                "criteria_name": criteria.name,
                "criteria_sha256": file_sha256(run_dir / CRITERIA_FILE),
                "steps": {},
            },
        )
        run.save()
        return run

    @classmethod
    def open(cls, run_dir: Path) -> Run:
        state_path = run_dir / STATE_FILE
        if not state_path.is_file():
            raise ConfigError(f"--resume {run_dir}: not a run folder (no {STATE_FILE})")
        state = json.loads(state_path.read_text())
        config = build(RetrainConfig, yaml.safe_load((run_dir / CONFIG_FILE).read_text()))
        if file_sha256(run_dir / CRITERIA_FILE) != state["criteria_sha256"]:
            raise ConfigError(f"{run_dir / CRITERIA_FILE} changed since the run started; criteria are declared once")
        return cls(run_dir, config, state)

    def save(self) -> None:
        self.write_json(STATE_FILE, self.state)

    def step(self, name: str) -> Any:
        return self.state["steps"].get(name)

    def record(self, name: str, value: Any) -> Any:
        self.state["steps"][name] = value
        self.save()
        return value

    def write_json(self, name: str, value: Any) -> None:
        # A resumed run trusts what it finds: a kill mid-write must leave the old file or the new.
        write_atomic(self.dir / name, json.dumps(value, indent=2, default=str).encode())

    def finish(self, status: Status, reason: str = "", **extra: Any) -> dict[str, Any]:
        self.state.update(status=status, reason=reason, finished_at=datetime.now(UTC).isoformat(), **extra)
        self.save()
        steps = self.state["steps"]
        report = {
            **{k: v for k, v in self.state.items() if k != "steps"},
            "data": steps.get("snapshot"),
            "training_data": steps.get("training_data"),
            "gates": steps.get("gates"),
            "reward_model": steps.get("reward_model"),
            "train": steps.get("train"),
            "verdict": steps.get("verdict"),
            "checkpoints": steps.get("checkpoints"),
            "run_dir": str(self.dir),
        }
        write_report(self.dir, report)
        return {
            "status": status,
            "reason": reason,
            "run_dir": str(self.dir),
            "parent": self.state["parent"],
            "candidate": self.state.get("candidate"),
        }


# ---- gates -------------------------------------------------------------------------------


def _gate(name: str, value: float | None, bar: float | None, allow_unmeasured: bool, why_unmeasured: str) -> dict[str, Any]:
    if bar is None:
        return {"name": name, "value": value, "bar": None, "passed": True, "skipped": True, "reason": "not gated"}
    if value is None or math.isnan(value):
        return {
            "name": name,
            "value": None,
            "bar": bar,
            "passed": allow_unmeasured,
            "skipped": allow_unmeasured,
            "reason": f"cannot be measured: {why_unmeasured}",
        }
    ok = value >= bar
    return {
        "name": name,
        "value": value,
        "bar": bar,
        "passed": ok,
        "reason": f"{value:.4g} {'>=' if ok else '<'} {bar}",
    }


def count_new_pairs(data: PreferenceData, parent_card: Any) -> int:
    """Trainable preference rows the parent was not trained on.

    Store rows: those not in the pairs-table version the parent was trained on (all of them
    when the parent came from elsewhere). File rows: all of them, unless the parent was
    trained on the same file (same hash).
    """
    rows = data.rows
    if "label" in rows.columns:
        rows = rows[rows["label"] == "preference"]
    parent_data = parent_card.training_config.get("data") or {}
    if data.version is not None:
        parent_version = parent_data.get("version")
        if parent_version is None:
            return len(rows)
        from tuneloop.store.read import load_row_ids

        try:
            seen = load_row_ids(data.store_root, int(parent_version))
        except (ValueError, OSError) as err:
            # An erasure's vacuum removed that version's files: nothing is known as seen.
            log.warning("parent snapshot unreadable", extra={"fields": {"version": parent_version, "error": str(err)}})
            return len(rows)
        return int((~rows["row_id"].isin(seen)).sum())
    trained_on = parent_data.get("sha256")
    return 0 if trained_on and trained_on == data.sha256 else len(rows)


def check_gates(config: RetrainConfig, data: PreferenceData, parent_card: Any) -> dict[str, Any]:
    g = config.gates
    new_pairs = count_new_pairs(data, parent_card)
    checks = [
        {
            "name": "new_pairs",
            "value": new_pairs,
            "bar": g.min_new_pairs,
            "passed": new_pairs >= g.min_new_pairs,
            "reason": f"{new_pairs} new preference pairs since {parent_card.ref} (need {g.min_new_pairs})",
        }
    ]
    store = config.preferences.store_root
    if store is None:
        for name in ("agreement", "kappa", "anchor_accuracy"):
            checks.append({"name": name, "passed": True, "skipped": True, "reason": "preferences come from a file"})
    else:
        from tuneloop.store.agreement import measure_tenants

        # Each tenant's annotators are measured on their own: one tenant's judgements can
        # neither carry another's data past the gates nor hold it back.
        for tenant, quality in measure_tenants(store, config.preferences.tenants).items():
            anchored = [a for a in quality.annotators if a.anchors > 0]
            anchor_accuracy = (
                sum(a.anchor_accuracy * a.anchors for a in anchored) / sum(a.anchors for a in anchored)
                if anchored else None
            )
            no_overlap = "no item was judged by two annotators"
            measured = [
                _gate("agreement", quality.percent_agreement if quality.items else None, g.min_agreement,
                      g.allow_unmeasured, no_overlap),
                _gate("kappa", quality.kappa if quality.items else None, g.min_kappa, g.allow_unmeasured,
                      no_overlap + " or all labels agree"),
                _gate("anchor_accuracy", anchor_accuracy, g.min_anchor_accuracy, g.allow_unmeasured,
                      "no anchor judgements"),
            ]
            checks += [{**check, "tenant": tenant} for check in measured]
    failed = [c for c in checks if not c["passed"]]
    reasons = [f"{c['name']}: {c['reason']}" + (f" (tenant {c['tenant']})" if "tenant" in c else "") for c in failed]
    return {"passed": not failed, "checks": checks, "reason": "; ".join(reasons)}


# ---- the pipeline ------------------------------------------------------------------------


def _load_data(run: Run) -> PreferenceData:
    """The run's snapshot: pinned at the first attempt, identical on resume."""
    source = run.config.preferences
    pinned = run.step("snapshot")
    if pinned is None:
        data = load_preferences(source)
        run.record("snapshot", {**data.lineage(), "offsets": data.offsets})
        return data
    if source.store_root is not None:
        return load_preferences(source.model_copy(update={"snapshot": pinned["source"]}))
    data = load_preferences(source)
    if data.sha256 != pinned["sha256"]:
        raise ConfigError(f"preferences.path {source.path} changed since the run started")
    return data


def _reward_func(run: Run, reg: Registry) -> Any:
    """The reward function for RL and the win rate, pinned to one reward model version per run."""
    from tuneloop.trainer.config import RewardSource
    from tuneloop.trainer.rewards import reward_function

    config = run.config
    if config.reward_target:
        return reward_function(RewardSource(target=config.reward_target))
    ref = run.step("reward_ref")
    if ref is None:
        names = reg.names()
        version = reg.current(config.reward_name, "production") if config.reward_name in names else None
        ref = run.record("reward_ref", f"{config.reward_name}@{version}" if version else "")
    if not ref:
        return None
    return reward_function(RewardSource(model=ref), config.registry_root)


def _finished_stage(run: Run) -> dict[str, Any] | None:
    out = run.dir / TRAIN_DIR
    if (out / STAGE_FILE).is_file() and (out / FINAL_DIR).is_dir():
        return json.loads((out / STAGE_FILE).read_text())
    return None


def _train(run: Run, reg: Registry, pairs: Any, reward: Any) -> dict[str, Any]:
    finished = _finished_stage(run)  # finished before a kill hit the state write
    if finished is not None:
        return finished
    from tuneloop.trainer.evaluate import release_engine

    settings = TrainerSettings()
    if settings.processes > 1 or not run.config.params().watch.eval_every:
        # Kept only for the watch: an idle engine holds memory (on a GPU, what training needs),
        # and on two CPU cores the same training step took about a quarter longer beside it.
        # The candidate's evaluation then starts another.
        release_engine()
    if settings.processes == 1:
        return _train_here(run, pairs, reward)
    # Each launch is numbered so that the other nodes join each one once (`follow`).
    attempt = run.record("train_launch", int(run.step("train_launch") or 0) + 1)
    command = launch_command(settings, ["retrain-stage", str(run.dir)], job_run_id() or run.state["run_id"])
    log.info("training on several processes", extra={"fields": {
        "processes": settings.processes, "nodes": settings.nodes, "attempt": attempt, "command": command}})
    code = subprocess.run(command, check=False).returncode
    finished = _finished_stage(run)
    if code != 0 or finished is None:
        raise RuntimeError(f"the training stage on {settings.processes} processes failed (torchrun exit code {code})")
    return finished


def train_stage(run_dir: Path) -> dict[str, Any]:
    """The training stage of the run in `run_dir`, in one of the processes torchrun started.

    Reads what the pipeline pinned (snapshot, reward model) and writes nothing but the
    stage's own output (rank 0's); the pipeline records the step.
    """
    run = Run.open(run_dir)
    if run.step("snapshot") is None:
        raise ConfigError(f"{run_dir}: the run has no pinned snapshot yet; retrain starts its training stage")
    needs_reward = algorithms.get(run.config.algorithm).needs_reward
    reward = _reward_func(run, registry(run.config.registry_root)) if needs_reward else None
    return _train_here(run, _preference_pairs(run, _load_data(run)), reward)


def _preference_pairs(run: Run, data: PreferenceData) -> Any:
    """The pairs the policy trains on; what was left out and why is in `data.summary`."""
    return to_dpo_dataset(data, run.config.preferences.honour_weight, seed=run.config.params().seed)


def _train_here(run: Run, pairs: Any, reward: Any) -> dict[str, Any]:
    from tuneloop.trainer.stages import StageData, StageRun

    config = run.config
    algorithm = algorithms.get(config.algorithm)
    if algorithm.needs_reward and reward is None:
        raise ConfigError(f"{config.algorithm} needs rewards: set reward_target or register {config.reward_name}@production")
    metrics = config.metrics.model_copy(update={"run_label": config.metrics.run_label or run.state["run_id"]})
    where = StageRun(
        model=run.state["parent"],
        output_dir=run.dir / TRAIN_DIR,
        registry_root=config.registry_root,
        metrics=metrics,
        resume=True,
        criteria=run.dir / CRITERIA_FILE,
    )
    assert algorithm.train is not None  # RetrainConfig.algorithm names policy algorithms only
    return algorithm.train(config.params(), StageData(preferences=pairs, reward=reward), where).to_json()


def _evaluate_candidates(run: Run, criteria: cr.Criteria, reward: Any, parent_dir: Path) -> None:
    """Evaluates the final model and the kept checkpoints before it, records one row each, and
    writes the chosen one's evaluation as eval_after.json (the final model's when none passes).
    Each evaluation is kept, so a resumed run does not repeat it."""
    from tuneloop.trainer.evaluate import evaluate

    found = selection.candidates(run.dir / TRAIN_DIR, int(run.step("train")["steps"]), run.config.select_checkpoints)
    evaluated = []
    for candidate in found:
        name = f"eval_{candidate.name}.json"
        if not (run.dir / name).is_file():
            model_dir = selection.materialise(candidate, parent_dir, run.dir / CANDIDATES_DIR)
            run.write_json(name, evaluate(model_dir, criteria, reward_func=reward, reference_dir=parent_dir))
        evaluated.append((candidate, json.loads((run.dir / name).read_text())))
    before = json.loads((run.dir / "eval_before.json").read_text())
    chosen, rows = selection.choose(before, evaluated, criteria)
    pick = chosen or found[-1]
    run.record("checkpoints", rows)
    run.record("chosen_checkpoint", pick.name)
    run.write_json("eval_after.json", dict(evaluated)[pick])


def _candidate_dir(run: Run) -> Path:
    """The folder to register: the final model, or the chosen checkpoint as `materialise` wrote it."""
    chosen = run.step("chosen_checkpoint")
    return run.dir / TRAIN_DIR / FINAL_DIR if chosen in (None, selection.FINAL) else run.dir / CANDIDATES_DIR / chosen


def _register(run: Run, reg: Registry, parent_card: Any, data: PreferenceData, verdict: cr.Verdict) -> str:
    """Registers the candidate once per run, even if a kill hit between registering and recording it."""
    config = run.config
    run_id = run.state["run_id"]
    for card in reg.list(config.policy_name):
        if card.training_config.get("run_id") == run_id:
            return card.ref
    after = json.loads((run.dir / "eval_after.json").read_text())
    card = reg.register(
        config.policy_name,
        _candidate_dir(run),
        kind="policy",
        parent=parent_card.ref,
        dataset_snapshot=data.offsets,
        training_config={
            "run_id": run_id,
            "checkpoint": run.step("chosen_checkpoint") or selection.FINAL,
            "algorithm": config.algorithm,
            "params": config.params().model_dump(mode="json"),
            "data": data.lineage(),
            "criteria": {"name": run.state["criteria_name"], "sha256": run.state["criteria_sha256"]},
            "reward": run.step("reward_ref") or config.reward_target,
        },
        metrics={
            "verdict": verdict.model_dump(),
            "eval": {k: after[k] for k in ("behaviour", "degeneration", "mean_length_tokens", "reward_mean", "kl_to_reference", "probe_pass_rate")},
            "train": run.step("train"),
            "gates": run.step("gates"),
        },
        description=f"{config.algorithm} of {parent_card.ref} on {data.source}: "
        + ("criteria hold" if verdict.passed else "refused: " + verdict.summary()),
    )
    return card.ref


def _pipeline(run: Run, reg: Registry) -> dict[str, Any]:
    from tuneloop.trainer.evaluate import evaluate

    config = run.config
    criteria = cr.load_criteria(run.dir / CRITERIA_FILE)
    parent = run.state["parent"]
    parent_card = reg.card(parent)
    parent_dir = reg.resolve(parent)

    data = _load_data(run)
    gates = run.step("gates") or run.record("gates", check_gates(config, data, parent_card))
    if not gates["passed"]:
        return run.finish("refused", f"gates: {gates['reason']}")
    try:
        pairs = _preference_pairs(run, data)
    except NoTrainingPairs as err:
        run.record("training_data", data.summary)
        return run.finish("refused", f"training data: {err}")
    # The same snapshot, rules and seed give the same summary: a resumed run records it again.
    run.record("training_data", data.summary)

    if config.reward_model is not None and run.step("reward_model") is None:
        # Trained on the data read above, and registered (and promoted) through `reg`, whose
        # listener publishes the model events the Reward service follows (alias_follower).
        stage = config.reward_stage_config(data.source, run.dir / "reward")
        result = algorithms.get("reward").run(stage, data=data, registry=reg)
        run.record("reward_model", asdict(result.registered))
    reward_stage = run.step("reward_model")
    if reward_stage and not reward_stage["promoted"] and algorithms.get(config.algorithm).needs_reward:
        return run.finish("refused", f"reward model {reward_stage['ref']} failed its gate: {reward_stage['refused_reason']}")

    reward = _reward_func(run, reg)
    if run.step("eval_before") is None:
        run.write_json("eval_before.json", evaluate(parent_dir, criteria, reward_func=reward))
        run.record("eval_before", "eval_before.json")

    if run.step("train") is None:
        run.record("train", _train(run, reg, pairs, reward))
    if run.step("eval_after") is None:
        if config.select_checkpoints > 1:
            _evaluate_candidates(run, criteria, reward, parent_dir)
        else:
            candidate_dir = run.dir / TRAIN_DIR / FINAL_DIR
            run.write_json("eval_after.json", evaluate(candidate_dir, criteria, reward_func=reward, reference_dir=parent_dir))
        run.record("eval_after", "eval_after.json")

    before = json.loads((run.dir / "eval_before.json").read_text())
    after = json.loads((run.dir / "eval_after.json").read_text())
    verdict = cr.compare(before, after, criteria)
    run.write_json("verdict.json", verdict.model_dump())
    run.record("verdict", verdict.model_dump())

    candidate = run.step("register") or run.record("register", _register(run, reg, parent_card, data, verdict))
    run.state["candidate"] = candidate
    if not verdict.passed:
        rows = run.step("checkpoints")
        if rows and len(rows) > 1:
            return run.finish("refused", f"criteria: {selection.refusal(rows)}")
        return run.finish("refused", f"criteria: {verdict.summary()}")
    current = reg.current(config.policy_name, "production")
    if f"{config.policy_name}@{current}" != parent:
        return run.finish("refused", f"production moved from {parent} to {config.policy_name}@{current} during the run")
    reg.promote(config.policy_name, candidate.split("@", 1)[1], "production")
    log.info("promoted", extra={"fields": {"candidate": candidate, "parent": parent}})
    _record_on_job(candidate)
    return run.finish("promoted")


def _record_on_job(candidate: str) -> None:
    """Annotate the trainer's Job with the promoted version (`tuneloop jobs list` shows it)."""
    try:
        record_promoted_version(candidate)
    except Exception:  # noqa: BLE001 - the promotion stands; only its note on the Job is missing
        log.exception("recording the promoted version on the Job failed")


def runs_dir(config: RetrainConfig) -> Path:
    return Path(config.runs_dir or TrainerSettings().runs_dir)


def job_run_id() -> str | None:
    """Inside a Kubernetes Job (the chart's trainer), the run is the Job's: a pod the Job starts
    after losing one continues the same run instead of starting over."""
    return os.environ.get(JOB_NAME_ENV) or None


def _read_state(run_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((run_dir / STATE_FILE).read_text())
    except FileNotFoundError:
        return None


def follow(config: RetrainConfig, settings: TrainerSettings) -> dict[str, Any]:
    """A node other than 0: joins each training stage node 0 launches, until the run has trained.

    The run folder (on storage every node mounts) says when: node 0 numbers each launch in
    state.json just before starting torchrun. A refused or finished run needs no training.
    """
    job = job_run_id()
    if job is None:
        raise ConfigError(f"nodes > 1 needs the Job's name ({JOB_NAME_ENV}): it names the run every node follows")
    run_dir = runs_dir(config) / job
    joined: set[int] = set()
    log.info("following node 0's run", extra={"fields": {"run_dir": str(run_dir), "node_rank": settings.node_rank}})
    while True:
        state = _read_state(run_dir)
        if state is not None:
            steps = state["steps"]
            if state["status"] in ("promoted", "refused") or "train" in steps:
                return {"status": "followed", "node_rank": settings.node_rank, "run_dir": str(run_dir),
                        "run_status": state["status"], "joined": sorted(joined)}
            attempt = steps.get("train_launch")
            if attempt is not None and attempt not in joined:
                joined.add(attempt)
                command = launch_command(settings, ["retrain-stage", str(run_dir)], job)
                code = subprocess.run(command, check=False).returncode
                if code == 0:
                    continue  # node 0 records the step next; the loop then returns
                log.warning("training stage failed on this node; waiting for node 0's next launch",
                            extra={"fields": {"attempt": attempt, "exit_code": code}})
        time.sleep(FOLLOW_POLL_S)


def run_retrain(config: RetrainConfig | None = None, *, resume: Path | None = None) -> dict[str, Any]:
    """Runs (or resumes) one retrain; returns the outcome. Errors are recorded in the run, then raised.

    In a Job whose run folder already exists (an earlier pod of the same Job was lost), the run
    resumes from that folder.
    """
    if (config is None) == (resume is None):
        raise ConfigError("give a config for a new run or --resume RUN_DIR, not both")
    if world_size() > 1:
        # Gates, evaluations, registry writes and promotion are one decision, made once; the
        # training stage is started on several processes by retrain itself.
        raise ConfigError(
            "retrain runs as one process and starts its training stage on several itself: launch it without "
            "torchrun/accelerate and set TUNELOOP_TRAINER_PROCESSES_PER_NODE (and _NODES) instead"
        )
    settings = TrainerSettings()
    job_run = job_run_id()
    if config is not None and job_run and (runs_dir(config) / job_run / STATE_FILE).is_file():
        log.info("resuming the Job's run", extra={"fields": {"run": job_run}})
        config, resume = None, runs_dir(config) / job_run
    opened = Run.open(Path(resume)) if resume is not None else None
    run_config = opened.config if opened is not None else config
    assert run_config is not None
    if settings.node_rank > 0:
        return follow(run_config, settings)
    events = None
    if run_config.kafka_bootstrap_servers:
        from tuneloop.common.model_events import KafkaModelEvents

        root = run_config.registry_root or registry().root
        events = KafkaModelEvents(run_config.kafka_bootstrap_servers, str(root))
    reg = registry(run_config.registry_root)
    reg.on_event = events
    run = opened or Run.create(run_config, reg)
    if run.state["status"] in ("promoted", "refused"):
        log.info("run already finished", extra={"fields": {"status": run.state["status"]}})
        return run.finish(run.state["status"], run.state.get("reason", ""))
    run.state.update(status="running", reason="")
    run.save()
    from tuneloop.trainer.evaluate import keep_engine

    try:
        # One vLLM engine answers the parent's evaluation, the watch's measurements and the
        # candidate's evaluation, where vLLM answers at all.
        with keep_engine():
            return _pipeline(run, reg)
    except BaseException as err:
        run.finish("failed", f"{type(err).__name__}: {err}", error=repr(err))
        raise
    finally:
        if events is not None:
            events.close()
