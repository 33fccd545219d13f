"""The reward-hacking watch: reward is a proxy, so a run that pleases it while getting worse
at what was declared must be seen while it trains, not after.

Every logged step the watch reads the stage's reward, KL and response-length ratio (as
`metrics.StepMetrics` names them); every `watch.eval_every` steps it also measures an eval
metric on the live model — by default the criteria file's behaviour checks and probes on a
few held-out prompts, greedy. It flags:

- `reward_up_eval_down`: against the best eval among the last `watch.window` measurements
  (the first taken before training), the reward is now higher and the eval metric lower,
  each by more than `watch.min_change`;
- `kl_out_of_bounds`: KL to the reference above `watch.max_kl`;
- `length_out_of_bounds`: response length ratio outside `watch.length_ratio`.

A flag is a line in metrics.jsonl (`watch_flag`), a WARNING log, the
`tuneloop_trainer_watch_flags_total{flag}` counter, and an entry in the stage's result; with
`watch.stop` the stage stops at that step (and its model is what the criteria then judge).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from tuneloop.trainer.config import WatchParams
from tuneloop.trainer.metrics import StepMetrics

log = logging.getLogger(__name__)

EvalFn = Callable[[Any], float]


def _vllm_refusal(model: Any) -> str | None:
    """Why the live model cannot be handed to a vLLM engine by saving its weights."""
    if hasattr(model, "peft_config"):
        # vLLM would need merged weights; merging in place and back would round the base
        # weights being trained.
        return "the model trains LoRA adapters"
    if not hasattr(model, "save_pretrained"):
        return f"{type(model).__name__} cannot be saved as a model folder"
    return None


class CriteriaEval:
    """Eval metric from a criteria file: the mean of each behaviour check's pass rate and the
    probes' pass rate, on the first `prompts` held-out prompts plus every probe, greedy.

    With vLLM (the criteria's `generation.engine`), one engine answers every measurement of
    the stage: a retrain's (`evaluate.keep_engine`), else one that starts at the first
    measurement; before each the live model's weights are saved to a scratch folder and loaded
    into it in place (about a second for a 135M model, against tens of seconds for a start).
    `close()` stops an engine of the watch's own (the watch does at the end of training).
    """

    def __init__(self, criteria_path: Path, model_ref: Path, prompts: int) -> None:
        from tuneloop.trainer import criteria as cr
        from tuneloop.trainer.distributed import world_size
        from tuneloop.trainer.evaluate import choose_engine
        from tuneloop.trainer.modeling import load_tokenizer

        self.spec = cr.load_criteria(criteria_path)
        self.held = self.spec.held_out_prompts[:prompts]
        self.model_ref = model_ref
        self.tokenizer = load_tokenizer(model_ref, padding_side="left")
        self.engine_name = choose_engine(self.spec.generation, model_ref)
        if self.engine_name == "vllm" and world_size() > 1:
            # Every process measures; one engine each would share the cores several ways.
            log.info("watch: measuring with transformers, not vLLM: %d training processes", world_size())
            self.engine_name = "transformers"
        self._prompts: Any = None  # the held-out prompts and probes as chats, at first use
        self._keeper: Any = None
        self._own_keeper: Any = None
        self._scratch: Any = None

    def _vllm_answers(self, model: Any) -> Any:
        import tempfile

        from tuneloop.trainer.evaluate import EngineKeeper, answer, criteria_prompts, kept_engine

        if self._keeper is None:
            self._scratch = tempfile.TemporaryDirectory(prefix="watch-weights-")
            # A retrain's engine (it evaluated the parent just before), else one of the watch's own.
            self._keeper = kept_engine()
            if self._keeper is None:
                self._keeper = self._own_keeper = EngineKeeper()
            held, probes = criteria_prompts(self.spec, self.held)
            self._prompts = held + probes
        engine = self._keeper.engine(self.model_ref, self.tokenizer, self._prompts, self.spec.generation)
        scratch = Path(self._scratch.name)
        model.save_pretrained(scratch, safe_serialization=True)
        self._keeper.load(scratch)
        return answer(None, self.tokenizer, self.spec, self.held, engine=engine)

    def __call__(self, model: Any) -> float:
        from tuneloop.trainer import criteria as cr
        from tuneloop.trainer.evaluate import answer

        if self.engine_name == "vllm" and (reason := _vllm_refusal(model)) is not None:
            log.info("watch: measuring with transformers, not vLLM: %s", reason)
            self.engine_name = "transformers"
        if self.engine_name == "vllm":
            held_answers, probe_answers = self._vllm_answers(model)
        else:
            was_training = model.training
            model.eval()
            try:
                held_answers, probe_answers = answer(model, self.tokenizer, self.spec, self.held)
            finally:
                model.train(was_training)
        texts = [a for a, _ in held_answers]
        scores = [cr.pass_rate(c, texts) for c in self.spec.behaviour]
        if self.spec.probes.items:
            right = [cr.probe_passes(p, a) for p, (a, _) in zip(self.spec.probes.items, probe_answers, strict=True)]
            scores.append(sum(right) / len(right))
        return sum(scores) / len(scores) if scores else 0.0

    def close(self) -> None:
        if self._own_keeper is not None:
            self._own_keeper.close()
        self._keeper = self._own_keeper = None
        if self._scratch is not None:
            self._scratch.cleanup()
            self._scratch = None


def criteria_eval(criteria_path: Path, model_ref: Path, prompts: int) -> CriteriaEval:
    """The watch's default eval metric (see `CriteriaEval`)."""
    return CriteriaEval(criteria_path, model_ref, prompts)


class HackingWatch(TrainerCallback):
    """Checks every logged step against the watch's rules; see the module docstring."""

    def __init__(self, params: WatchParams, sink: StepMetrics, eval_fn: EvalFn | None = None) -> None:
        self.params = params
        self.sink = sink
        self.eval_fn = eval_fn
        self.rewards: list[float] = []  # the latest reward at each evaluation
        self.evals: list[float] = []
        self.last_reward: float | None = None
        self.baseline_eval: float | None = None  # measured before the first update
        self.flags: list[dict[str, Any]] = []
        self.due = False

    # --- rules, separate from the trainer plumbing so they are testable on plain numbers ---
    def observe(self, step: int, row: dict[str, Any]) -> list[str]:
        """Bounds on one logged row; remembers its reward for the next evaluation."""
        p, found = self.params, []
        if row.get("reward") is not None:
            self.last_reward = float(row["reward"])
            if self.baseline_eval is not None and not self.evals:
                # The first logged reward was measured on the batch before its update: it pairs
                # with the eval taken before training.
                self.rewards.append(self.last_reward)
                self.evals.append(self.baseline_eval)
        kl = row.get("kl")
        if p.max_kl is not None and kl is not None and kl > p.max_kl:
            found.append(self._flag(step, "kl_out_of_bounds", f"KL {kl:.3f} > {p.max_kl}"))
        ratio = row.get("response_length_ratio")
        if p.length_ratio is not None and ratio is not None and not p.length_ratio[0] <= ratio <= p.length_ratio[1]:
            found.append(self._flag(step, "length_out_of_bounds", f"length ratio {ratio:.2f} outside {list(p.length_ratio)}"))
        return found

    def evaluated(self, step: int, value: float) -> list[str]:
        """One eval measurement, paired with the latest reward. Flags when, against the best
        eval among the last `window` measurements, reward is now higher and eval lower."""
        if self.last_reward is None:
            return []
        self.rewards.append(self.last_reward)
        self.evals.append(value)
        recent = list(zip(self.rewards, self.evals))[-self.params.window :]
        if len(recent) < 2:
            return []
        best_reward, best_eval = max(recent[:-1], key=lambda pair: pair[1])
        d_reward, d_eval = self.last_reward - best_reward, value - best_eval
        if d_reward > self.params.min_change and d_eval < -self.params.min_change:
            return [self._flag(step, "reward_up_eval_down",
                               f"reward {d_reward:+.3f} while eval {d_eval:+.3f} from its best of the last {len(recent)} measurements")]
        return []

    def _flag(self, step: int, name: str, detail: str) -> str:
        self.flags.append({"step": step, "flag": name, "detail": detail})
        self.sink.flag(step, name, detail)
        log.warning("watch flag %s at step %d: %s", name, step, detail)
        return name

    def begin(self, step: int, model: Any) -> None:
        """The eval metric before the first update (when the watch measures one)."""
        if self.eval_fn is not None and self.params.eval_every:
            self.baseline_eval = self.eval_fn(model)
            self.sink.log(step, {"eval_metric": self.baseline_eval})

    def check(self, step: int, row: dict[str, Any] | None, model: Any, measure: bool) -> list[str]:
        """One logged step (`row`), plus an eval measurement when `measure`; returns new flags."""
        found = self.observe(step, row) if row is not None else []
        if measure and self.eval_fn is not None and model is not None:
            value = self.eval_fn(model)
            self.sink.log(step, {"eval_metric": value})
            found += self.evaluated(step, value)
        return found

    def should_stop(self, found: list[str]) -> bool:
        return bool(found) and self.params.stop

    # --- trainer plumbing ---
    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: Any = None, **kwargs: Any) -> None:
        if model is not None:
            self.begin(state.global_step, model)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        every = self.params.eval_every
        if self.eval_fn is not None and every and state.global_step % every == 0:
            self.due = True  # measured at this step's log, so the eval pairs with the step's reward

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, Any] | None = None, model: Any = None, **kwargs: Any) -> None:
        if not logs or "train_runtime" in logs or self.sink.last_row is None:
            return
        found = self.check(state.global_step, self.sink.last_row, model, self.due)
        self.due = False
        if self.should_stop(found):
            control.should_training_stop = True

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        # A vLLM engine behind the eval metric holds a copy of the model and processes.
        close = getattr(self.eval_fn, "close", None)
        if close is not None:
            close()
