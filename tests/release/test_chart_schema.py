"""values.schema.json holds the code's own schemas (scripts/gen_chart_schema.py): the trainer's
RetrainConfig and Criteria documents, and the TUNELOOP_* variables the settings classes read.
The committed schema must be fresh, and helm must refuse, naming the field, what the code
would refuse.
"""

from __future__ import annotations

import copy
import functools
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.chart import CHART, HELM, REPO, SERVICES, VALUES, helm, pod_specs, render, template_args

SCRIPT = REPO / "scripts" / "gen_chart_schema.py"
ENV_LISTS = ("", *SERVICES, "trainer")  # "" is the top-level extraEnv, shared by every container

pytestmark = pytest.mark.skipif(not HELM.exists(), reason=f"helm not built at {HELM} (run `make setup`)")


def test_schema_is_fresh():
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr + "\n(run `make chart-schema`)"


def test_check_mode_notices_a_stale_schema(tmp_path):
    stale = tmp_path / "values.schema.json"
    text = (CHART / "values.schema.json").read_text().replace('"RetrainConfig.GateParams"', '"RetrainConfig.Gates"', 1)
    stale.write_text(text)
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--check", "--schema", str(stale)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 1
    assert "stale" in result.stderr
    assert stale.read_text() == text  # --check writes nothing


# ---------------------------------------------------------------- the trainer's documents


def _default_values() -> dict[str, Any]:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def _set(doc: dict[str, Any], path: list[str | int], value: Any) -> dict[str, Any]:
    """`doc` with `value` at `path`, as `helm --set` would make it (lists grow, None deletes)."""
    doc = copy.deepcopy(doc)
    node: Any = doc
    for key, nxt in zip(path, path[1:], strict=False):
        if isinstance(node, list):
            while len(node) <= key:
                node.append(None)
        if (node[key] if isinstance(node, list) else node.get(key)) is None:
            node[key] = [] if isinstance(nxt, int) else {}
        node = node[key]
    last = path[-1]
    if isinstance(node, list):
        while len(node) <= last:
            node.append(None)
        node[last] = value
    elif value is None:
        node.pop(last, None)
    else:
        node[last] = value
    return doc


# (--set, where the value lands in the document, its value, the field helm must name (below the
# document), what it must say)
RETRAIN_CASES = [
    ("stages[0]=dpo", ["stages", 0], "dpo", "", "'stages'"),
    ("success_criteria=/etc/x.yaml", ["success_criteria"], "/etc/x.yaml", "", "'success_criteria'"),
    ("dpo.max_steps=many", ["dpo", "max_steps"], "many", "/dpo/max_steps", "want integer"),
    ("gates.min_kappa=high", ["gates", "min_kappa"], "high", "/gates/min_kappa", "want number"),
    ("algorithm=sft", ["algorithm"], "sft", "/algorithm", "must be one of"),
    ("dpo.loss_type=bogus", ["dpo", "loss_type"], "bogus", "/dpo/loss_type", "must be one of"),
    ("dpo.lora.rank=8", ["dpo", "lora", "rank"], 8, "/dpo/lora", "'rank'"),
    ("gates.min_agreement=2", ["gates", "min_agreement"], 2, "/gates/min_agreement", "maximum"),
    # Fields the pipeline sets itself are refused in reward_model; unknown ones too.
    ("reward_model.store_root=/x", ["reward_model", "store_root"], "/x", "/reward_model", "'store_root'"),
    ("reward_model.epochz=2", ["reward_model", "epochz"], 2, "/reward_model", "'epochz'"),
    ("criteria=null", ["criteria"], None, "", "'criteria'"),
]
CRITERIA_CASES = [
    ("policy.max_kl=10", ["policy", "max_kl"], 10, "", "'policy'"),
    ("held_out_prompts=null", ["held_out_prompts"], None, "", "'held_out_prompts'"),
    ("kl.max_kl=0", ["kl", "max_kl"], 0, "/kl/max_kl", "exclusiveMinimum"),
    ("behaviour[0].kind=nope", ["behaviour", 0, "kind"], "nope", "/behaviour/0", "oneOf"),
    ("degeneration.ngram=three", ["degeneration", "ngram"], "three", "/degeneration/ngram", "want integer"),
]


def _refused(*settings: str) -> str:
    result = helm(*template_args([], *settings), check=False)
    assert result.returncode != 0, f"helm accepted {settings}"
    return result.stderr


CASE_FIELDS = ("setting", "path", "value", "field", "message")


@pytest.mark.parametrize(CASE_FIELDS, RETRAIN_CASES, ids=[c[0] for c in RETRAIN_CASES])
def test_retrain_config_the_code_refuses_is_refused_by_helm(setting, path, value, field, message, tmp_path):
    field = f"/trainer/retrainConfig{field}"
    from tuneloop.trainer.config import ConfigError, load_config
    from tuneloop.trainer.retrain import RetrainConfig

    # The code refuses it ...
    doc = _set(_default_values()["trainer"]["retrainConfig"], path, value)
    (tmp_path / "retrain.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError):
        load_config(RetrainConfig, tmp_path / "retrain.yaml")
    # ... and so do helm template and helm lint, naming the field.
    stderr = _refused("--set", f"trainer.retrainConfig.{setting}")
    assert f"at '{field}'" in stderr and message in stderr, stderr
    lint = helm("lint", "--strict", str(CHART), "--set", f"trainer.retrainConfig.{setting}", check=False)
    assert lint.returncode != 0 and f"'{field}'" in lint.stdout + lint.stderr


@pytest.mark.parametrize(CASE_FIELDS, CRITERIA_CASES, ids=[c[0] for c in CRITERIA_CASES])
def test_criteria_the_code_refuses_are_refused_by_helm(setting, path, value, field, message, tmp_path):
    field = f"/trainer/successCriteria{field}"
    from tuneloop.trainer.config import ConfigError
    from tuneloop.trainer.criteria import load_criteria

    doc = _set(_default_values()["trainer"]["successCriteria"], path, value)
    (tmp_path / "criteria.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError):
        load_criteria(tmp_path / "criteria.yaml")
    stderr = _refused("--set", f"trainer.successCriteria.{setting}")
    assert f"at '{field}'" in stderr and message in stderr, stderr


# Fields with run-time defaults (env, device), the other algorithms' sections, optional parts.
ACCEPTED_CASES = [
    ("kafka_bootstrap_servers=kafka:9092", ["kafka_bootstrap_servers"], "kafka:9092"),
    ("dpo.bf16=true", ["dpo", "bf16"], True),
    ("dpo.optim=adamw_torch", ["dpo", "optim"], "adamw_torch"),
    ("reward_model=null", ["reward_model"], None),
    ("reward_model.base_model=reward@v0001", ["reward_model", "base_model"], "reward@v0001"),
    ("algorithm=ppo", ["algorithm"], "ppo"),
    ("ppo.kl.adaptive=true", ["ppo", "kl", "adaptive"], True),
    ("dpo.loss_type=ipo", ["dpo", "loss_type"], "ipo"),
]


@pytest.mark.parametrize(("setting", "path", "value"), ACCEPTED_CASES, ids=[c[0] for c in ACCEPTED_CASES])
def test_retrain_config_the_code_takes_passes_the_schema(setting, path, value, tmp_path):
    from tuneloop.trainer.config import load_config
    from tuneloop.trainer.retrain import RetrainConfig

    doc = _set(_default_values()["trainer"]["retrainConfig"], path, value)
    (tmp_path / "retrain.yaml").write_text(yaml.safe_dump(doc))
    load_config(RetrainConfig, tmp_path / "retrain.yaml")
    helm(*template_args([], "--set", f"trainer.retrainConfig.{setting}"))


def test_tuples_are_checked_as_tuples():
    helm(*template_args([], "--set-json", "trainer.retrainConfig.dpo.watch.length_ratio=[0.5, 2.0]"))
    stderr = _refused("--set-json", "trainer.retrainConfig.dpo.watch.length_ratio=[0.5, 2.0, 3.0]")
    assert "at '/trainer/retrainConfig/dpo/watch/length_ratio'" in stderr, stderr


# ---------------------------------------------------------------- environment variables


@functools.cache
def _settings_env_names() -> frozenset[str]:
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import gen_chart_schema
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return frozenset(n for cls in gen_chart_schema.settings_classes() for n in gen_chart_schema.env_names(cls))


@pytest.mark.parametrize("where", ENV_LISTS, ids=[w or "top-level" for w in ENV_LISTS])
def test_extra_env_names_a_variable_no_settings_class_reads_is_refused(where):
    key = f"{where}.extraEnv" if where else "extraEnv"
    for name in ("TUNELOOP_LOG_LEVEL", "TUNELOOP_GENERATION_TORCH_THREAD"):
        stderr = _refused("--set", f"{key}[0].name={name}", "--set", f"{key}[0].value=1")
        assert f"at '/{key.replace('.', '/')}/0/name'" in stderr, stderr
    # Variables the code reads, and other variables, pass.
    helm(*template_args(
        [],
        "--set", f"{key}[0].name=TUNELOOP_GENERATION_TORCH_THREADS", "--set-string", f"{key}[0].value=1",
        "--set", f"{key}[1].name=TUNELOOP_STORE_ROOT", "--set", f"{key}[1].value=/data",
        "--set", f"{key}[2].name=HF_HOME", "--set", f"{key}[2].value=/tmp/hf",
    ))


def test_the_schema_knows_the_variables_the_settings_classes_read():
    from tuneloop.common.kafka import KafkaSettings
    from tuneloop.feedback.settings import FeedbackSettings

    schema = json.loads((CHART / "values.schema.json").read_text())
    enum = set(schema["definitions"]["tuneloopEnvName"]["enum"])
    assert enum == {n for n in _settings_env_names() if n.startswith("TUNELOOP_")}
    assert {f"TUNELOOP_KAFKA_{f.upper()}" for f in KafkaSettings.model_fields} <= enum
    # An alias is read instead of (and with populate_by_name, besides) the prefixed name.
    assert "TUNELOOP_STORE_ROOT" in enum and "store_root" in FeedbackSettings.model_fields
    assert "TUNELOOP_LOG_LEVEL" not in enum


@pytest.mark.parametrize("values", sorted(VALUES))
def test_every_tuneloop_variable_the_chart_sets_is_read_by_the_code(values):
    from tuneloop.trainer.jobs import JOB_NAME_ENV, JOB_NAMESPACE_ENV

    # The trainer reads its Job's name and namespace directly (not a setting one may change).
    read = _settings_env_names() | {JOB_NAME_ENV, JOB_NAMESPACE_ENV}
    for where, spec in pod_specs(render(values)).items():
        for c in spec["containers"]:
            unread = {e["name"] for e in c.get("env") or []} - read
            assert not {n for n in unread if n.startswith("TUNELOOP_")}, (where, c["name"], unread)


def test_every_shipped_values_file_is_rendered_by_the_tests():
    # Every values file the chart ships is rendered by the chart tests (and so by the loaders').
    shipped = {p for p in CHART.glob("values*.yaml")} | set(CHART.glob("ci/*.yaml"))
    assert shipped == {Path(p) for files in VALUES.values() for p in files} | {CHART / "values.yaml"}
