"""Per-step training metrics: a JSONL in the run folder and Prometheus gauges.

A trainer Job lives minutes to hours and has no scrape target a Prometheus could rely on,
so the gauges are pushed rather than scraped: after every logged step they are written to
`<run>/metrics.prom` (Prometheus text format; point a node-exporter textfile collector at
it, or at the extra path in `metrics.textfile`) and, when a Pushgateway is configured
(`metrics.pushgateway` or TUNELOOP_TRAINER_PUSHGATEWAY), pushed to it under job
`tuneloop_trainer`, grouped by stage and run. A push that fails is logged, never fatal.

Gauges: `tuneloop_trainer_reward` (mean reward of the step's samples, or DPO's implicit
reward margin), `tuneloop_trainer_kl` (mean KL to the reference per response),
`tuneloop_trainer_response_length_ratio` (mean response length over the first step's: the
length drift that reward hacking shows as), `tuneloop_trainer_step`,
`tuneloop_trainer_eval_metric` (the hacking watch's eval metric), the counter
`tuneloop_trainer_watch_flags_total{flag}` (see `watch.py`), and
`tuneloop_trainer_last_success_timestamp_seconds` (set when a stage finishes; the chart's
alert fires when it grows stale).
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, push_to_gateway, write_to_textfile
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from tuneloop.trainer.config import MetricsParams, TrainerSettings
from tuneloop.trainer.distributed import is_main_process

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
PROM_FILE = "metrics.prom"

# TRL's log keys -> our names, so every stage's JSONL and plots read the same way.
ALIASES = {
    "reward": "reward",
    "rewards/margins": "reward",
    "kl": "kl",
    "objective/kl": "kl",
    "completions/mean_length": "response_length",
    "entropy": "entropy",
    "clip_ratio/region_mean": "clip_fraction",
    "value_loss": "value_loss",
}


class StepMetrics:
    """Appends one JSON line per logged step and refreshes the gauges."""

    def __init__(self, run_dir: Path, stage: str, params: MetricsParams | None = None) -> None:
        params = params or MetricsParams()
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS_FILE
        self.stage = stage
        self.run = params.run_label or self.run_dir.name
        settings = TrainerSettings()
        extra = params.textfile or settings.prom_textfile
        self.textfiles = [self.run_dir / PROM_FILE] + ([Path(extra)] if extra else [])
        self.pushgateway = params.pushgateway or settings.pushgateway
        self._baseline_length = self._first_length()
        # A private registry: these gauges describe this run, not the process's services.
        self.registry = CollectorRegistry()
        labels = ["stage", "run"]
        self.gauges = {
            "reward": Gauge("tuneloop_trainer_reward", "Mean reward of the last step's samples.", labels, registry=self.registry),
            "kl": Gauge("tuneloop_trainer_kl", "Mean KL to the reference model per response (nats).", labels, registry=self.registry),
            "response_length_ratio": Gauge(
                "tuneloop_trainer_response_length_ratio",
                "Mean response length of the last step over the first step's.",
                labels,
                registry=self.registry,
            ),
            "step": Gauge("tuneloop_trainer_step", "Last logged optimizer step.", labels, registry=self.registry),
            "eval_metric": Gauge("tuneloop_trainer_eval_metric", "The hacking watch's last eval metric.", labels, registry=self.registry),
        }
        self.flags = Counter("tuneloop_trainer_watch_flags", "Hacking-watch flags raised.", [*labels, "flag"], registry=self.registry)
        self.last_success = Gauge("tuneloop_trainer_last_success_timestamp_seconds",
                                  "Unix time the stage last finished.", labels, registry=self.registry)
        self.last_row: dict[str, Any] | None = None
        # Under several training processes every one keeps its rows (the hacking watch reads
        # them and must decide alike everywhere, or the processes would stop at different
        # steps); the main one writes files, gauges and log lines.
        self.writes = is_main_process()

    def _first_length(self) -> float | None:
        """On resume the baseline is the first length this stage ever logged, not the resumed one."""
        if not self.path.is_file():
            return None
        for line in self.path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            if row.get("stage") == self.stage and row.get("response_length"):
                return float(row["response_length"])
        return None

    def log(self, step: int, values: dict[str, Any]) -> dict[str, Any]:
        row: dict[str, Any] = {"stage": self.stage, "step": step, "time": time.time()}
        for key, value in values.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                row[key] = float(value)
        for source, name in ALIASES.items():
            if source in row and name not in values:
                row.setdefault(name, row[source])
        length = row.get("response_length")
        if length:
            if self._baseline_length is None:
                self._baseline_length = length
            row["response_length_ratio"] = length / self._baseline_length
        self.last_row = row
        if self.writes:
            self._append(row)
            self._export(row)
            log.info("step", extra={"fields": row})
        return row

    def flag(self, step: int, name: str, detail: str) -> None:
        if not self.writes:
            return
        self._append({"stage": self.stage, "step": step, "time": time.time(), "watch_flag": name, "detail": detail})
        self.flags.labels(stage=self.stage, run=self.run, flag=name).inc()
        self._export({})

    def finished(self) -> None:
        if not self.writes:
            return
        self.last_success.labels(stage=self.stage, run=self.run).set(time.time())
        self._export({})

    def _append(self, row: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def _export(self, row: dict[str, Any]) -> None:
        for name, gauge in self.gauges.items():
            value = row.get(name)
            if value is not None and math.isfinite(value):
                gauge.labels(stage=self.stage, run=self.run).set(value)
        for path in self.textfiles:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_to_textfile(str(path), self.registry)
        if self.pushgateway:
            try:
                push_to_gateway(
                    self.pushgateway,
                    job="tuneloop_trainer",
                    registry=self.registry,
                    grouping_key={"stage": self.stage, "run": self.run},
                    timeout=5,
                )
            except OSError as err:
                log.warning("metrics push to %s failed: %s", self.pushgateway, err)


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS_FILE
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


class MetricsCallback(TrainerCallback):
    """Feeds a transformers/TRL trainer's logs into StepMetrics."""

    def __init__(self, sink: StepMetrics) -> None:
        self.sink = sink

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        # The end-of-training summary (train_runtime, ...) is not a step.
        if logs and "train_runtime" not in logs:
            self.sink.log(state.global_step, logs)
