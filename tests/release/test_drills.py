"""Fault drills: the real services as processes, a real broker, and something broken on purpose
while work flows through them. Each drill prints one line,

    drill <name>: accepted=N stored=N lost=N duplicated=N

and fails on any loss or duplicate. `accepted` is what the system acknowledged to its client
(feedback ACCEPTED or DUPLICATE, a completion served, a training run finished); `stored` is
how much of it is found where it must end up (the preference store, the completion log, the
registry).

    .venv/bin/python -m pytest -m heavy tests/release/test_drills.py     (or: make drill)
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from kafka import KafkaConsumer, TopicPartition

from tuneloop.common.local_kafka import LocalBroker, install
from tuneloop.common.kafka import COMPLETIONS_TOPIC, KafkaSettings, end_offsets, ensure_topics, make_producer
from tuneloop.common.tiny_models import make_tiny
from tuneloop.common.processes import ServiceProcess
from tuneloop.common.registry import Registry
from tuneloop.store.read import current_snapshot, load_judgements, load_rows
from tuneloop.v1 import completion_pb2, feedback_pb2, feedback_pb2_grpc, generation_pb2, generation_pb2_grpc

pytestmark = pytest.mark.heavy

ACCEPTED, DUPLICATE = feedback_pb2.SUBMIT_STATUS_ACCEPTED, feedback_pb2.SUBMIT_STATUS_DUPLICATE
# The outcomes a client cannot tell apart from "maybe stored": it must retry them with the same id.
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
CHOICES = (
    feedback_pb2.PAIRWISE_CHOICE_A,
    feedback_pb2.PAIRWISE_CHOICE_B,
    feedback_pb2.PAIRWISE_CHOICE_TIE,
    feedback_pb2.PAIRWISE_CHOICE_BOTH_BAD,
)


def report(
    capsys: pytest.CaptureFixture[str], name: str, accepted: set[str], stored: list[str], detail: str = ""
) -> None:
    """Print the drill's line (and what it went through), then fail on loss, duplicates, or
    anything stored that was never acknowledged."""
    counts = Counter(stored)
    lost = sorted(accepted - counts.keys())
    duplicated = sorted(i for i, n in counts.items() if n > 1)
    foreign = sorted(counts.keys() - accepted)
    line = (
        f"drill {name}: accepted={len(accepted)} stored={len(counts.keys() & accepted)} "
        f"lost={len(lost)} duplicated={len(duplicated)}"
    )
    with capsys.disabled():
        print("\n" + line + (f"\n  ({detail})" if detail else ""))
    assert not lost, f"{line}; lost e.g. {lost[:5]}"
    assert not duplicated, f"{line}; duplicated e.g. {duplicated[:5]}"
    assert not foreign, f"{line}; stored but never acknowledged: {foreign[:5]}"


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str, interval_s: float = 0.25) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)


# --- ingestion: completions on Kafka, feedback through the service, the store consuming ---


@dataclass
class Ingestion:
    """Feedback service and preference store as processes, on topics of their own."""

    root: Path
    bootstrap: str
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:8])

    def __post_init__(self) -> None:
        self.feedback_topic = f"drill.feedback.{self.tag}"
        self.completions_topic = f"drill.completions.{self.tag}"
        self.kafka = KafkaSettings(bootstrap_servers=self.bootstrap)
        self.store_root = self.root / "store"
        env = {
            "TUNELOOP_KAFKA_BOOTSTRAP_SERVERS": self.bootstrap,
            "TUNELOOP_FEEDBACK_TOPIC": self.feedback_topic,
            # Answer UNAVAILABLE soon during an outage, so the client's retries show.
            "TUNELOOP_FEEDBACK_PRODUCE_TIMEOUT_S": "3",
            "TUNELOOP_STORE_ROOT": str(self.store_root),
            "TUNELOOP_STORE_FEEDBACK_TOPIC": self.feedback_topic,
            "TUNELOOP_STORE_COMPLETIONS_TOPIC": self.completions_topic,
            "TUNELOOP_STORE_DLQ_TOPIC": f"drill.dlq.{self.tag}",
            "TUNELOOP_STORE_GROUP_ID": f"drill-store-{self.tag}",
            "TUNELOOP_STORE_BATCH_LINGER_S": "0.2",
            "TUNELOOP_STORE_BATCH_MAX_RECORDS": "50",
        }
        self.feedback = ServiceProcess("feedback", [], env, self.root)
        self.store = ServiceProcess("store", [], env, self.root)

    def completion_pairs(self, pairs: int) -> list[tuple[str, str]]:
        """Two completions of one prompt per pair, on the completions topic before any feedback."""
        ensure_topics(self.kafka, [self.feedback_topic, self.completions_topic])
        producer = make_producer(self.kafka)
        out = []
        for i in range(pairs):
            request_id = f"req-{self.tag}-{i}"
            prompt = completion_pb2.Prompt(
                chat=completion_pb2.Conversation(
                    messages=[completion_pb2.ChatMessage(role="user", content=f"Question {i}: what is {i} + {i}?")]
                )
            )
            ids = []
            for index, text in enumerate((f"{2 * i}.", f"It is {2 * i}, I think.")):
                cid = "cmpl-" + uuid.uuid4().hex
                record = completion_pb2.CompletionRecord(
                    completion_id=cid, request_id=request_id, conversation_id=request_id, tenant="drill",
                    prompt=prompt, rendered_prompt=f"<|im_start|>user\nQuestion {i}<|im_end|>\n",
                    completion=completion_pb2.Completion(completion_id=cid, index=index, text=text),
                    model=completion_pb2.ModelVersion(name="policy", version="v0001"),
                )
                record.created_at.GetCurrentTime()
                producer.send(self.completions_topic, key=request_id.encode(), value=record.SerializeToString())
                ids.append(cid)
            out.append((ids[0], ids[1]))
        producer.flush()
        producer.close()
        return out

    def stored_event_ids(self) -> list[str]:
        """Event ids of the stored judgements and training rows (one each per pairwise event)."""
        judgements = list(load_judgements(self.store_root)["event_id"])
        rows = load_rows(self.store_root)
        assert Counter(rows["event_id"]) == Counter(judgements), "rows and judgements disagree"
        return judgements

    def wait_until_store_caught_up(self, timeout_s: float = 120.0) -> None:
        """Until the store has handled every record on the feedback topic (its snapshot reaches the end)."""
        ends = end_offsets(self.kafka, self.feedback_topic)

        def caught_up() -> bool:
            done = current_snapshot(self.store_root, [self.feedback_topic]).offsets.get(self.feedback_topic, {})
            return all(done.get(p, 0) >= end for p, end in ends.items())

        wait_for(caught_up, timeout_s, f"the store to consume {self.feedback_topic} up to {ends}")

    def kafka_copies(self) -> int:
        """Feedback records on the topic: more than the events when retries produced some twice."""
        return len(read_topic(self.kafka, self.feedback_topic))

    def stop(self) -> None:
        self.feedback.stop()
        self.store.stop()


class FeedbackClient(threading.Thread):
    """Submits pairwise events one by one, retrying UNAVAILABLE with the same event id, as a
    well-behaved app does. `done[event_id]` is the final status; other errors fail the drill."""

    def __init__(self, target: str, pairs: list[tuple[str, str]], events: int, pause_s: float) -> None:
        super().__init__(name="feedback-client", daemon=True)
        rng = random.Random(7)
        self.events = []
        for i in range(events):
            a, b = pairs[rng.randrange(len(pairs))]
            event = feedback_pb2.FeedbackEvent(
                event_id=uuid.uuid4().hex, tenant="drill", source=feedback_pb2.FEEDBACK_SOURCE_ANNOTATOR,
                annotator_id=f"ann-{i % 5}", project="drill",
                pairwise=feedback_pb2.PairwiseJudgement(completion_a_id=a, completion_b_id=b, choice=CHOICES[i % 4]),
            )
            event.created_at.GetCurrentTime()
            self.events.append(event)
        self.target = target
        self.pause_s = pause_s
        self.done: dict[str, int] = {}
        self.retries = 0
        self.errors: list[str] = []
        self._halt = threading.Event()

    @property
    def acknowledged(self) -> set[str]:
        return {i for i, status in self.done.items() if status in (ACCEPTED, DUPLICATE)}

    def progress(self) -> float:
        return len(self.done) / len(self.events)

    def run(self) -> None:
        channel = grpc.insecure_channel(self.target)
        stub = feedback_pb2_grpc.FeedbackStub(channel)
        try:
            for event in self.events:
                while not self._halt.is_set():
                    try:
                        self.done[event.event_id] = stub.Submit(event, timeout=15).status
                        break
                    except grpc.RpcError as err:
                        if err.code() not in RETRYABLE:
                            self.errors.append(f"{event.event_id}: {err.code().name} {err.details()}")
                            return
                        self.retries += 1
                        time.sleep(0.2)
                time.sleep(self.pause_s)
        finally:
            channel.close()

    def finish(self, timeout_s: float) -> None:
        self.join(timeout_s)
        if self.is_alive():
            self._halt.set()
            self.join(30)
            raise AssertionError(f"the feedback client did not finish in {timeout_s:.0f} s ({len(self.done)} done)")
        assert not self.errors, self.errors


@pytest.fixture
def ingestion(tmp_path: Path) -> Iterator[Callable[[str], Ingestion]]:
    made: list[Ingestion] = []

    def make(bootstrap: str) -> Ingestion:
        made.append(Ingestion(tmp_path, bootstrap))
        return made[-1]

    yield make
    for ing in made:
        ing.stop()


def test_broker_restart_during_ingestion_loses_and_doubles_nothing(
    tmp_path: Path, ingestion: Callable[[str], Ingestion], capsys: pytest.CaptureFixture[str]
) -> None:
    # A broker of its own: restarting the session's would disturb every other test.
    with LocalBroker(tmp_path / "kafka", home=install()) as broker:
        ing = ingestion(broker.bootstrap)
        pairs = ing.completion_pairs(40)
        ing.feedback.start()
        ing.store.start()
        # Thousands of events: each restart then lands on a steady stream, not its first records
        # (about 80 s in all on 2 busy cores; the waits leave room for a slower machine).
        client = FeedbackClient(ing.feedback.target, pairs, events=2000, pause_s=0.01)
        client.start()
        wait_for(lambda: client.progress() >= 0.3, 180, "a third of the feedback")
        broker.restart()
        wait_for(lambda: client.progress() >= 0.6, 180, "two thirds of the feedback")
        broker.restart(crash=True)
        client.finish(300)
        assert client.retries > 0, "the restarts never reached the client: the drill tested nothing"
        # Stopped first so that no record of a timed-out call can still land after the count.
        ing.feedback.stop()
        ing.wait_until_store_caught_up()
        stored = ing.stored_event_ids()
        detail = f"client retries={client.retries}, feedback records in Kafka={ing.kafka_copies()}"
        ing.stop()  # before its broker goes
    report(capsys, "broker-restart", client.acknowledged, stored, detail)


def test_store_killed_mid_stream_resumes_exactly_once(
    kafka_bootstrap: str, ingestion: Callable[[str], Ingestion], capsys: pytest.CaptureFixture[str]
) -> None:
    ing = ingestion(kafka_bootstrap)
    pairs = ing.completion_pairs(40)
    ing.feedback.start()
    ing.store.start()
    client = FeedbackClient(ing.feedback.target, pairs, events=300, pause_s=0.01)
    client.start()
    kills = 0
    for share in (0.3, 0.6):
        wait_for(lambda share=share: client.progress() >= share, 60, f"{share:.0%} of the feedback")
        # Kill only once the store has committed since its (re)start: a kill then lands on a
        # store with work in flight, not on one still starting up.
        committed = len(load_judgements(ing.store_root))
        wait_for(lambda committed=committed: len(load_judgements(ing.store_root)) > committed, 30, "a store commit")
        ing.store.kill()
        kills += 1
        ing.store.start()
    client.finish(180)
    ing.feedback.stop()
    ing.wait_until_store_caught_up()
    assert kills == 2
    detail = f"store SIGKILLed {kills} times, feedback records in Kafka={ing.kafka_copies()}"
    report(capsys, "store-kill", client.acknowledged, ing.stored_event_ids(), detail)


# --- promotion under load: the generation service swaps versions while serving ---

QUESTION = "What is the capital of France?"


@dataclass
class Served:
    version: str
    text: str
    logprobs: list[float]
    completion_ids: list[str]


class GenerationClient(threading.Thread):
    """Sends greedy requests back to back until stopped; no retries: every failure counts."""

    def __init__(self, target: str, name: str) -> None:
        super().__init__(name=name, daemon=True)
        self.target = target
        self.served: list[Served] = []
        self.errors: list[str] = []
        self._halt = threading.Event()

    def count(self, version: str) -> int:
        return sum(s.version == version for s in self.served)

    def run(self) -> None:
        request = generation_pb2.GenerateRequest(
            prompt=completion_pb2.Prompt(
                chat=completion_pb2.Conversation(messages=[completion_pb2.ChatMessage(role="user", content=QUESTION)])
            ),
            sampling=completion_pb2.SamplingParams(temperature=0.0, max_tokens=8, logprobs=True),
            tenant="drill",
        )
        with grpc.insecure_channel(self.target) as channel:
            stub = generation_pb2_grpc.GenerationStub(channel)
            while not self._halt.is_set():
                try:
                    resp = stub.Generate(request, timeout=60)
                except grpc.RpcError as err:
                    self.errors.append(f"{err.code().name}: {err.details()}")
                    continue
                first = resp.completions[0]
                self.served.append(
                    Served(resp.model.version, first.text, [t.logprob for t in first.logprobs],
                           [c.completion_id for c in resp.completions])
                )

    def finish(self) -> None:
        self._halt.set()
        self.join(90)
        assert not self.is_alive(), f"{self.name} is stuck"


def perturbed_copy(policy: Path, out: Path) -> Path:
    """The policy with seeded noise on every weight: another version that answers measurably otherwise."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * 0.05)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(policy).save_pretrained(out)
    return out


def distance(a: list[float], b: list[float]) -> float:
    """Largest difference of two log-probability sequences (infinite when their lengths differ)."""
    return max((abs(x - y) for x, y in zip(a, b, strict=True)), default=0.0) if len(a) == len(b) else float("inf")


def read_topic(kafka: KafkaSettings, topic: str, start: dict[int, int] | None = None) -> list[bytes]:
    """The values of `topic` from `start` (default: the beginning) up to its end now."""
    ends = end_offsets(kafka, topic)
    consumer = KafkaConsumer(bootstrap_servers=kafka.bootstrap_servers, group_id=None, enable_auto_commit=False)
    out = []
    try:
        parts = [TopicPartition(topic, p) for p in ends]
        consumer.assign(parts)
        for tp in parts:
            consumer.seek(tp, (start or {}).get(tp.partition, 0))
        deadline = time.monotonic() + 60
        while any(consumer.position(tp) < ends[tp.partition] for tp in parts):
            assert time.monotonic() < deadline, f"could not read {topic} to its end"
            for records in consumer.poll(timeout_ms=500).values():
                out.extend(r.value for r in records)
    finally:
        consumer.close()
    return out


def test_promotion_under_load_fails_no_request_and_logs_every_completion_once(
    tmp_path: Path, kafka_bootstrap: str, capsys: pytest.CaptureFixture[str]
) -> None:
    registry = Registry(tmp_path / "registry")
    policy, _reward = make_tiny(tmp_path / "tiny")
    registry.register("policy", policy, kind="policy", description="tiny, seed 0")
    registry.register("policy", perturbed_copy(policy, tmp_path / "perturbed"), kind="policy", description="perturbed")
    registry.promote("policy", "v0001")
    kafka = KafkaSettings(bootstrap_servers=kafka_bootstrap)
    ensure_topics(kafka, [COMPLETIONS_TOPIC])
    start = end_offsets(kafka, COMPLETIONS_TOPIC)

    env = {
        "TUNELOOP_KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "TUNELOOP_REGISTRY_ROOT": str(registry.root),
        "TUNELOOP_GENERATION_ENGINE": "transformers",
        "TUNELOOP_GENERATION_MODEL": "policy@production",
        "TUNELOOP_GENERATION_ALIAS_POLL_S": "0.5",
        "TUNELOOP_GENERATION_SPOOL_PATH": str(tmp_path / "completions.spool"),
    }
    clients = []
    with ServiceProcess("generation", [], env, tmp_path) as generation:
        clients = [GenerationClient(generation.target, f"client-{i}") for i in range(3)]
        try:
            for c in clients:
                c.start()
            wait_for(lambda: all(c.count("v0001") >= 10 for c in clients), 120, "answers from v0001")
            registry.promote("policy", "v0002")
            wait_for(lambda: all(c.count("v0002") >= 10 for c in clients), 120, "answers from v0002")
        finally:
            for c in clients:
                c.finish()
        with grpc.insecure_channel(generation.target) as channel:
            stub = generation_pb2_grpc.GenerationStub(channel)
            listed = stub.ListModels(generation_pb2.ListModelsRequest(), timeout=10)
        # SIGTERM drains and flushes the completion log before the count below.
    assert [m.model.version for m in listed.models] == ["v0002"]

    served = [s for c in clients for s in c.served]
    assert not [e for c in clients for e in c.errors], [e for c in clients for e in c.errors][:5]
    for c in clients:
        versions = [s.version for s in c.served]
        switch = versions.index("v0002")
        # One client's requests are sequential: once the new version answered, the old never does again.
        assert set(versions[:switch]) == {"v0001"} and set(versions[switch:]) == {"v0002"}, versions
    # Greedy answers are one answer per version (text and token log-probabilities, up to batching
    # noise), and the versions' answers differ: the version a response names is the one that ran.
    first = {v: next(s for s in served if s.version == v) for v in ("v0001", "v0002")}
    for s in served:
        ref = first[s.version]
        assert s.text == ref.text and distance(s.logprobs, ref.logprobs) < 1e-3, (s, ref)
    assert distance(first["v0001"].logprobs, first["v0002"].logprobs) > 1e-2, first

    by_id = {cid: s.version for s in served for cid in s.completion_ids}
    logged = (completion_pb2.CompletionRecord.FromString(v) for v in read_topic(kafka, COMPLETIONS_TOPIC, start))
    records = [r for r in logged if r.completion_id in by_id]
    assert all(r.model.version == by_id[r.completion_id] for r in records), "a record names the wrong version"
    switched = {v: sum(s.version == v for s in served) for v in ("v0001", "v0002")}
    detail = f"{len(clients)} clients, served by v0001={switched['v0001']}, by v0002={switched['v0002']}"
    report(capsys, "promotion-under-load", set(by_id), [r.completion_id for r in records], detail)


# --- trainer: killed after its first checkpoint, resumed ---

TOPICS = ["cats", "rain", "tea", "maps", "trains", "books", "music", "bread"]
# Steps of the drill's DPO run, checkpointed every SAVE_STEPS: the kill right after the first
# checkpoint lands with most of the run still to go, however fast the machine.
MAX_STEPS, SAVE_STEPS = 30, 5


def last_checkpoint_step(checkpoints: Path) -> int | None:
    """The step of the newest complete HF checkpoint (its trainer_state.json is written last)."""
    steps = [
        int(p.name.split("-", 1)[1])
        for p in checkpoints.glob("checkpoint-*")
        if p.name.split("-", 1)[1].isdigit() and (p / "trainer_state.json").is_file()
    ]
    return max(steps, default=None)


def retrain_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "tuneloop.cli", "train", "retrain", *args]


def test_retrain_killed_after_a_checkpoint_changes_nothing_then_resumes_to_one_version(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    registry = Registry(tmp_path / "registry")
    policy, _reward = make_tiny(tmp_path / "tiny")
    registry.register("policy", policy, kind="policy", description="tiny, seed 0")
    registry.promote("policy", "v0001")
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("".join(
        json.dumps({"prompt": f"Tell me about {t}.", "chosen": f"Sure, {t} are nice.", "rejected": "No."}) + "\n"
        for t in TOPICS
    ))
    criteria = tmp_path / "criteria.yaml"
    # Criteria a tiny random model can be measured on; the drill is about the kill, not the verdict.
    criteria.write_text(json.dumps({
        "name": "drill",
        "generation": {"max_new_tokens": 8, "batch_size": 4},
        "held_out_prompts": ["Tell me about the sea.", "Tell me about bread and tea."],
        "degeneration": {"max_repeated_ngram_ratio": None, "max_wrong_language_rate": None},
        "length_drift": None,
    }))
    config = tmp_path / "retrain.yaml"
    config.write_text(json.dumps({
        "policy_name": "policy",
        "registry_root": str(registry.root),
        "runs_dir": str(tmp_path / "runs"),
        "preferences": {"path": str(prefs)},
        "criteria": str(criteria),
        "gates": {"min_new_pairs": 1},
        "algorithm": "dpo",
        "dpo": {"max_steps": MAX_STEPS, "save_steps": SAVE_STEPS, "save_total_limit": 2,
                "per_device_train_batch_size": 2, "learning_rate": 1e-3, "max_length": 64},
        "kafka_bootstrap_servers": None,
    }))
    env = {**os.environ, "TUNELOOP_REGISTRY_ROOT": str(registry.root)}
    log = (tmp_path / "retrain.log").open("ab")
    proc = subprocess.Popen(retrain_cmd("--config", str(config)), env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        def checkpointed() -> bool:
            assert proc.poll() is None, f"retrain ended ({proc.returncode}) before its first checkpoint"
            return any(last_checkpoint_step(d / "train" / "checkpoints") for d in (tmp_path / "runs").glob("*"))

        wait_for(checkpointed, 300, "the first training checkpoint", interval_s=0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
    (run_dir,) = (tmp_path / "runs").iterdir()
    killed_at = last_checkpoint_step(run_dir / "train" / "checkpoints")
    assert killed_at is not None and killed_at < MAX_STEPS
    # The kill changed nothing anyone serves or lists.
    assert registry.current("policy") == "v0001"
    assert registry.versions("policy") == ["v0001"]
    assert not (run_dir / "train" / "model").exists(), "a final model appeared although training was killed"

    done = subprocess.run(retrain_cmd("--resume", str(run_dir)), env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    outcome = json.loads(done.stdout.strip().splitlines()[-1])
    state = json.loads((run_dir / "state.json").read_text())
    train = state["steps"]["train"]
    assert train["resumed_from"] and int(train["resumed_from"].rsplit("-", 1)[1]) >= killed_at, train
    assert train["steps"] == MAX_STEPS

    run_id = state["run_id"]
    candidates = [c.version for c in registry.list("policy") if c.training_config.get("run_id") == run_id]
    assert outcome["status"] in ("promoted", "refused"), outcome
    if candidates:
        expected = candidates[0] if outcome["status"] == "promoted" else "v0001"
        assert registry.current("policy") == expected, (outcome, registry.current("policy"))
    detail = (f"killed after checkpoint-{killed_at}, resumed from {Path(train['resumed_from']).name}, "
              f"outcome {outcome['status']}, production={registry.current('policy')}")
    report(capsys, "trainer-kill", {run_id}, [run_id] * len(candidates), detail)
