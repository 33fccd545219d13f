"""Step metrics: the JSONL, the gauges in Prometheus text format, and the length-drift ratio."""

from __future__ import annotations

import json
import logging
import socket
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tuneloop.trainer.config import MetricsParams
from tuneloop.trainer.metrics import StepMetrics, read_metrics


def gauges(path: Path) -> dict[str, float]:
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(path.read_text())
        for sample in family.samples
        if sample.labels == {"stage": "ppo", "run": "run-1"}
    }


def test_jsonl_textfiles_and_length_ratio(tmp_path: Path) -> None:
    extra = tmp_path / "collector" / "tuneloop_trainer.prom"
    sink = StepMetrics(tmp_path / "run-1", "ppo", MetricsParams(textfile=extra))
    sink.log(1, {"reward": 0.5, "kl": 0.0, "response_length": 20.0, "note": "text is dropped"})
    sink.log(2, {"reward": 0.9, "kl": 1.5, "response_length": 30.0})
    rows = read_metrics(tmp_path / "run-1")
    assert [r["step"] for r in rows] == [1, 2]
    assert "note" not in rows[0]
    assert rows[1]["response_length_ratio"] == pytest.approx(1.5)
    for path in (tmp_path / "run-1" / "metrics.prom", extra):
        assert gauges(path) == {
            "tuneloop_trainer_reward": 0.9,
            "tuneloop_trainer_kl": 1.5,
            "tuneloop_trainer_response_length_ratio": 1.5,
            "tuneloop_trainer_step": 2.0,
        }
    # A resumed stage keeps the first length it ever logged as the baseline.
    resumed = StepMetrics(tmp_path / "run-1", "ppo", MetricsParams(textfile=extra))
    assert resumed.log(3, {"response_length": 10.0})["response_length_ratio"] == pytest.approx(0.5)


def test_trl_log_keys_map_to_our_names(tmp_path: Path) -> None:
    row = StepMetrics(tmp_path / "r", "rloo").log(
        1, {"reward": 0.2, "kl": 0.01, "completions/mean_length": 12.0, "clip_ratio/region_mean": 0.1}
    )
    assert (row["response_length"], row["clip_fraction"]) == (12.0, 0.1)
    dpo = StepMetrics(tmp_path / "d", "dpo").log(1, {"rewards/margins": 0.7, "loss": 0.6})
    assert dpo["reward"] == 0.7


def test_unreachable_pushgateway_does_not_stop_training(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again below: nothing listens there
    sink = StepMetrics(tmp_path / "run", "sft", MetricsParams(pushgateway=f"127.0.0.1:{port}"))
    with caplog.at_level(logging.WARNING):
        sink.log(1, {"loss": 1.0})
    assert "metrics push" in caplog.text
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text())["loss"] == 1.0
