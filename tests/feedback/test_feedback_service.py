"""The Feedback service against a real Kafka broker and a real gRPC server on a free port."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from tuneloop.common.local_kafka import free_port

from tuneloop.common.local_kafka import LocalBroker, install
from tuneloop.common.errors import field_of
from tuneloop.common.grpc_server import GrpcServer
from tuneloop.common.kafka import KafkaSettings, ensure_topics, make_producer
from tuneloop.feedback.dedup import RecentIds
from tuneloop.feedback.server import build_server, main
from tuneloop.feedback.validation import default_item_id
from tuneloop.v1 import completion_pb2, feedback_pb2, feedback_pb2_grpc
from tests.support.feedback import (
    ACCEPTED,
    DUPLICATE,
    Event,
    REJECTED,
    base,
    feedback_settings,
    pairwise,
    ranking,
    rating,
    read_topic,
    stub_for,
)


@pytest.fixture
def served(kafka_settings: KafkaSettings, unique_topic: str) -> Iterator[GrpcServer]:
    with build_server(feedback_settings(unique_topic), kafka_settings) as server:
        yield server


@pytest.fixture
def stub(served: GrpcServer) -> feedback_pb2_grpc.FeedbackStub:
    return stub_for(served)


@pytest.fixture(scope="module")
def validating_stub(kafka_bootstrap: str) -> Iterator[feedback_pb2_grpc.FeedbackStub]:
    """One server for the whole table of invalid events (each case only needs the answer)."""
    topic = f"test.feedback-validation.{uuid.uuid4().hex[:8]}"
    with build_server(feedback_settings(topic), KafkaSettings(bootstrap_servers=kafka_bootstrap)) as server:
        yield stub_for(server)


def stored_ids(bootstrap: str, topic: str) -> Counter[str]:
    return Counter(Event.FromString(r.value).event_id for r in read_topic(bootstrap, topic))


# --- validation: every rule answers INVALID_ARGUMENT naming its field ---


def _set(**fields: object) -> Callable[[Event], None]:
    def change(event: Event) -> None:
        for name, value in fields.items():
            target = event
            *path, last = name.split("__")
            for part in path:
                target = getattr(target, part)
            setattr(target, last, value)

    return change


def _clear(name: str) -> Callable[[Event], None]:
    return lambda event: event.ClearField(name)


def _future(event: Event) -> None:
    event.created_at.FromSeconds(int(time.time()) + 3600)


def _ranking_ids(*ids: str) -> Callable[[Event], None]:
    def change(event: Event) -> None:
        event.ranking.ClearField("completion_ids")
        event.ranking.completion_ids.extend(ids)

    return change


def _criteria(*names: str, marks: tuple[tuple[str, str], ...] = ()) -> Callable[[Event], None]:
    def change(event: Event) -> None:
        event.criteria.extend(names)
        event.marks.extend(feedback_pb2.CriterionMark(criterion=c, completion_id=cid, value=3) for c, cid in marks)

    return change


def _thumbs_without_value(event: Event) -> None:
    event.rating.ClearField("score")


INVALID = [
    ("no event id", pairwise, _set(event_id=""), "event_id"),
    ("event id too long", pairwise, _set(event_id="x" * 129), "event_id"),
    ("no created_at", pairwise, _clear("created_at"), "created_at"),
    ("created_at in the future", pairwise, _future, "created_at"),
    ("no source", pairwise, _set(source=feedback_pb2.FEEDBACK_SOURCE_UNSPECIFIED), "source"),
    ("no annotator", pairwise, _set(annotator_id=""), "annotator_id"),
    ("no judgement", base, lambda e: None, "judgement"),
    ("pairwise without A", pairwise, _set(pairwise__completion_a_id=""), "pairwise.completion_a_id"),
    ("pairwise without B", pairwise, _set(pairwise__completion_b_id=""), "pairwise.completion_b_id"),
    ("pairwise A equals B", pairwise, _set(pairwise__completion_b_id="cmpl-a"), "pairwise.completion_b_id"),
    ("pairwise choice unspecified", pairwise, _set(pairwise__choice=0), "pairwise.choice"),
    ("pairwise choice unknown", pairwise, _set(pairwise__choice=9), "pairwise.choice"),
    ("rating without completion", rating, _set(rating__completion_id=""), "rating.completion_id"),
    ("rating score above scale", rating, _set(rating__score=6), "rating.score"),
    ("rating score below scale", rating, _set(rating__score=0.5), "rating.score"),
    ("rating score NaN", rating, _set(rating__score=float("nan")), "rating.score"),
    ("rating score above default scale", rating, _set(rating__scale_min=0, rating__scale_max=0, rating__score=7),
     "rating.score"),
    ("rating empty scale", rating, _set(rating__scale_min=5, rating__scale_max=1), "rating.scale_max"),
    ("rating without value", rating, _thumbs_without_value, "rating.value"),
    ("ranking of one", ranking, _ranking_ids("c1"), "ranking.completion_ids"),
    ("ranking with a repeat", ranking, _ranking_ids("c1", "c2", "c1"), "ranking.completion_ids"),
    ("ranking with an empty id", ranking, _ranking_ids("c1", ""), "ranking.completion_ids[1]"),
    ("ranking too long", ranking, _ranking_ids(*(f"c{i}" for i in range(65))), "ranking.completion_ids"),
    ("comment too long", pairwise, _set(comment="x" * 4097), "comment"),
    ("criterion name too long", pairwise, _criteria("ok", "y" * 257), "criteria[1]"),
    ("criterion named twice", pairwise, _criteria("tone", "tone"), "criteria[1]"),
    ("too many criteria", pairwise, _criteria(*(f"k{i}" for i in range(33))), "criteria"),
    ("too many marks", pairwise, _criteria("tone", marks=(("tone", ""),) * 129), "marks"),
    ("mark on an undeclared criterion", pairwise, _criteria("tone", marks=(("tone", ""), ("safety", ""))),
     "marks[1].criterion"),
    ("mark on a completion not judged", pairwise, _criteria("tone", marks=(("tone", "cmpl-z"),)),
     "marks[0].completion_id"),
    ("item id too long", pairwise, _set(item_id="i" * 257), "item_id"),
]


@pytest.mark.parametrize(("make", "change", "field"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_event_is_rejected_naming_its_field(
    validating_stub: feedback_pb2_grpc.FeedbackStub, make: Callable[[], Event], change: Callable[[Event], None],
    field: str,
) -> None:
    event = make()
    change(event)
    with pytest.raises(grpc.RpcError) as err:
        validating_stub.Submit(event, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_of(err.value) == field


def test_every_table_base_event_is_valid(validating_stub: feedback_pb2_grpc.FeedbackStub) -> None:
    # Guards the table above: each case must fail for its change, not for its base event.
    for make in (pairwise, rating, ranking):
        assert validating_stub.Submit(make(), timeout=10).status == ACCEPTED


def test_default_item_id_is_the_sorted_completion_ids_whatever_the_order_shown() -> None:
    assert default_item_id(pairwise(a="x2", b="x1")) == default_item_id(pairwise(a="x1", b="x2")) == "x1|x2"
    assert default_item_id(ranking()) == "c1|c2|c3"
    assert default_item_id(rating()) == "cmpl-r"


# --- ingestion ---


def test_accepted_events_are_in_kafka_keyed_by_item_with_the_default_item_id(
    stub: feedback_pb2_grpc.FeedbackStub, kafka_bootstrap: str, unique_topic: str
) -> None:
    thumbs = base(
        rating=feedback_pb2.RatingJudgement(completion_id="cmpl-t", thumbs_up=False),
        source=feedback_pb2.FEEDBACK_SOURCE_END_USER,
    )
    tie = pairwise(a="cmpl-b", b="cmpl-a", item_id="", criteria=["tone"])
    tie.pairwise.choice = feedback_pb2.PAIRWISE_CHOICE_TIE
    tie.marks.add(criterion="tone", completion_id="cmpl-a", value=2)
    named = pairwise(item_id="queue-7/item-3", calibration=True, anchor=True)
    sent = [pairwise(), tie, rating(), thumbs, ranking(), named]
    for event in sent:
        result = stub.Submit(event, timeout=10)
        assert (result.event_id, result.status) == (event.event_id, ACCEPTED)

    records = {Event.FromString(r.value).event_id: r for r in read_topic(kafka_bootstrap, unique_topic)}
    assert sorted(records) == sorted(e.event_id for e in sent)
    for event in sent:
        record = records[event.event_id]
        stored = Event.FromString(record.value)
        expected_item = event.item_id or default_item_id(event)
        assert stored.item_id == expected_item
        assert record.key == expected_item.encode()
        stored.item_id = event.item_id
        assert stored == event
    assert records[tie.event_id].key == b"cmpl-a|cmpl-b"


def test_a_resubmitted_event_id_is_answered_duplicate_and_stored_once(
    stub: feedback_pb2_grpc.FeedbackStub, kafka_bootstrap: str, unique_topic: str
) -> None:
    event = pairwise()
    assert stub.Submit(event, timeout=10).status == ACCEPTED
    assert stub.Submit(event, timeout=10).status == DUPLICATE
    twice = rating()
    results = stub.SubmitBatch(feedback_pb2.SubmitBatchRequest(events=[twice, event, twice]), timeout=10).results
    assert [r.status for r in results] == [ACCEPTED, DUPLICATE, DUPLICATE]
    assert stored_ids(kafka_bootstrap, unique_topic) == {event.event_id: 1, twice.event_id: 1}


def test_a_batch_with_one_bad_event_accepts_the_others_and_rejects_just_that_one(
    stub: feedback_pb2_grpc.FeedbackStub, kafka_bootstrap: str, unique_topic: str
) -> None:
    events = [pairwise(), rating(), ranking(), pairwise(), rating()]
    events[2].ranking.completion_ids.append("c1")
    results = stub.SubmitBatch(feedback_pb2.SubmitBatchRequest(events=events), timeout=10).results
    assert [r.event_id for r in results] == [e.event_id for e in events]
    assert [r.status for r in results] == [ACCEPTED, ACCEPTED, REJECTED, ACCEPTED, ACCEPTED]
    assert (results[2].field, results[2].reason.startswith("not a permutation")) == ("ranking.completion_ids", True)
    assert not any(r.field for i, r in enumerate(results) if i != 2)
    assert stored_ids(kafka_bootstrap, unique_topic) == {e.event_id: 1 for i, e in enumerate(events) if i != 2}


def test_a_stream_of_100_events_is_acknowledged_each_in_order(
    stub: feedback_pb2_grpc.FeedbackStub, kafka_bootstrap: str, unique_topic: str
) -> None:
    events = [pairwise(a=f"a{i}", b=f"b{i}") for i in range(100)]
    response = stub.SubmitStream(iter(events), timeout=30)
    assert [(r.event_id, r.status) for r in response.results] == [(e.event_id, ACCEPTED) for e in events]
    assert stored_ids(kafka_bootstrap, unique_topic) == {e.event_id: 1 for e in events}


def test_batches_outside_the_size_bounds_are_refused_whole(
    kafka_settings: KafkaSettings, kafka_bootstrap: str, unique_topic: str
) -> None:
    with build_server(feedback_settings(unique_topic, max_batch_events=3), kafka_settings) as server:
        stub = stub_for(server)
        for call, events in [
            (lambda ev: stub.SubmitBatch(feedback_pb2.SubmitBatchRequest(events=ev), timeout=10), []),
            (lambda ev: stub.SubmitBatch(feedback_pb2.SubmitBatchRequest(events=ev), timeout=10), [pairwise()] * 4),
            (lambda ev: stub.SubmitStream(iter(ev), timeout=10), [pairwise() for _ in range(4)]),
        ]:
            with pytest.raises(grpc.RpcError) as err:
                call(events)
            assert (err.value.code(), field_of(err.value)) == (grpc.StatusCode.INVALID_ARGUMENT, "events")
    assert stored_ids(kafka_bootstrap, unique_topic) == {}


def test_a_restarted_server_still_answers_duplicate_from_the_topic_tail(
    kafka_settings: KafkaSettings, kafka_bootstrap: str, unique_topic: str
) -> None:
    event = ranking()
    with build_server(feedback_settings(unique_topic), kafka_settings) as server:
        assert stub_for(server).Submit(event, timeout=10).status == ACCEPTED
    with build_server(feedback_settings(unique_topic), kafka_settings) as server:
        assert stub_for(server).Submit(event, timeout=10).status == DUPLICATE
    with build_server(feedback_settings(unique_topic, warm_dedup_records=0), kafka_settings) as server:
        # Without the warm-up the window is empty: the event is produced again, and only the
        # store's dedup by event id keeps it once downstream.
        assert stub_for(server).Submit(event, timeout=10).status == ACCEPTED
    assert stored_ids(kafka_bootstrap, unique_topic) == {event.event_id: 2}


def test_recent_ids_forget_after_the_ttl_and_evict_the_least_recent() -> None:
    now = [1000.0]
    recent = RecentIds(capacity=2, ttl_s=60, clock=lambda: now[0])
    recent.add("a")
    recent.add("b")
    assert "a" in recent  # touching "a" makes "b" the least recent
    recent.add("c")
    assert ("a" in recent, "b" in recent, "c" in recent) == (True, False, True)
    now[0] += 61
    assert "a" not in recent and "c" not in recent
    recent.add("old", accepted_at=now[0] - 120)
    assert "old" not in recent


# --- Kafka down ---


@pytest.mark.heavy
def test_broker_down_answers_unavailable_and_no_acknowledged_event_is_lost(tmp_path: Path) -> None:
    topic = "test.feedback-outage"
    with LocalBroker(tmp_path / "kafka", home=install()) as broker:
        kafka = KafkaSettings(bootstrap_servers=broker.bootstrap)
        with build_server(feedback_settings(topic, produce_timeout_s=2.0), kafka) as server:
            stub = stub_for(server)
            before = [pairwise() for _ in range(5)]
            assert all(stub.Submit(e, timeout=10).status == ACCEPTED for e in before)

            broker.stop()
            during = [rating() for _ in range(5)]
            for event in during:
                with pytest.raises(grpc.RpcError) as err:
                    stub.Submit(event, timeout=10)
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            broker.start()

            # The client's retry, with the same ids: the outage's events may have landed late
            # (DUPLICATE) or not (ACCEPTED); the events acknowledged before it are DUPLICATE.
            answers: dict[str, int] = {}
            deadline = time.monotonic() + 60
            for event in before + during:
                while event.event_id not in answers:
                    assert time.monotonic() < deadline, "Feedback did not recover after the broker came back"
                    try:
                        answers[event.event_id] = stub.Submit(event, timeout=10).status
                    except grpc.RpcError as err:
                        assert err.code() == grpc.StatusCode.UNAVAILABLE
                        time.sleep(0.5)
            assert all(answers[e.event_id] == DUPLICATE for e in before)
            assert all(answers[e.event_id] in (ACCEPTED, DUPLICATE) for e in during)
        copies = stored_ids(broker.bootstrap, topic)

    # No acknowledged event is lost, and every id ends up readable. An outage event may be
    # there twice (its timed-out produce landed after the retry was produced); the store's
    # dedup by event id makes that harmless. Nothing else is ever doubled.
    assert set(copies) == {e.event_id for e in before + during}
    assert all(copies[e.event_id] == 1 for e in before)
    assert all(copies[e.event_id] in (1, 2) for e in during)
    assert sum(copies[e.event_id] == 2 for e in during) <= sum(answers[e.event_id] == ACCEPTED for e in during)


# --- agreement: delegated to the preference store's report ---


def test_get_agreement_reports_on_the_judgements_the_store_consumed(
    kafka_settings: KafkaSettings, kafka_bootstrap: str, unique_topic: str, tmp_path: Path
) -> None:
    from tuneloop.store.consumer import PreferenceStore
    from tuneloop.store.read import load_judgements
    from tuneloop.store.settings import StoreSettings

    completions = f"{unique_topic}.completions"
    ensure_topics(kafka_settings, [completions])
    producer = make_producer(kafka_settings)
    for item in range(3):
        prompt = completion_pb2.Prompt(raw=f"question {item}")
        for side in "ab":
            cid = f"c{item}{side}"
            record = completion_pb2.CompletionRecord(
                completion_id=cid, request_id=f"r{item}", conversation_id=f"r{item}", prompt=prompt, tenant="acme",
                completion=completion_pb2.Completion(completion_id=cid, text=f"answer {cid}"),
            )
            producer.send(completions, key=record.conversation_id.encode(), value=record.SerializeToString())
    producer.flush()
    producer.close()

    # Two annotators agree on items 0 and 1 and disagree on item 2.
    verdicts = {"ann-1": "ABA", "ann-2": "ABB"}
    choice = {"A": feedback_pb2.PAIRWISE_CHOICE_A, "B": feedback_pb2.PAIRWISE_CHOICE_B}
    events = []
    for annotator, choices in verdicts.items():
        for item, verdict in enumerate(choices):
            event = pairwise(a=f"c{item}a", b=f"c{item}b", annotator_id=annotator, tenant="acme")
            event.pairwise.choice = choice[verdict]
            events.append(event)
    store_root = tmp_path / "store"
    settings = feedback_settings(unique_topic, store_root=store_root)
    with build_server(settings, kafka_settings) as server:
        stub = stub_for(server)
        results = stub.SubmitBatch(feedback_pb2.SubmitBatchRequest(events=events), timeout=10).results
        assert [r.status for r in results] == [ACCEPTED] * 6

        store = PreferenceStore(
            StoreSettings(root=store_root, feedback_topic=unique_topic, completions_topic=completions,
                          dlq_topic=f"{unique_topic}.dlq", batch_linger_s=0.2),
            kafka_settings,
        )
        try:
            deadline = time.monotonic() + 60
            while len(load_judgements(store_root)) < 6:
                assert time.monotonic() < deadline, "the store did not take in the judgements"
                store.step()
        finally:
            store.close()

        report = stub.GetAgreement(feedback_pb2.AgreementRequest(tenant="acme", project="helpfulness"), timeout=30)
        other = stub.GetAgreement(feedback_pb2.AgreementRequest(tenant="acme", project="other"), timeout=30)
        stranger = stub.GetAgreement(feedback_pb2.AgreementRequest(tenant="globex", project="helpfulness"), timeout=30)
        with pytest.raises(grpc.RpcError) as refused:
            stub.GetAgreement(feedback_pb2.AgreementRequest(project="helpfulness"), timeout=30)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "tenant" in refused.value.details()

    # Labels per item: ann-1 (a, b, a), ann-2 (a, b, b): agreement 2/3; Cohen's kappa with
    # observed 2/3 and chance 4/9 is (2/3 - 4/9) / (1 - 4/9) = 0.4.
    assert (report.items, report.judgements, report.annotators, report.kappa_method) == (3, 6, 2, "cohen")
    assert report.percent_agreement == pytest.approx(2 / 3)
    assert report.kappa == pytest.approx(0.4)
    assert (other.items, other.judgements) == (0, 0)
    assert (stranger.items, stranger.judgements) == (0, 0), "another tenant sees none of them"


# --- metrics and start-up ---


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_metrics_count_events_by_kind_and_status_and_rejections_by_field(
    served: GrpcServer, stub: feedback_pb2_grpc.FeedbackStub
) -> None:
    accepted = ("tuneloop_feedback_events_total", (("kind", "ranking"), ("status", "accepted")))
    duplicate = ("tuneloop_feedback_events_total", (("kind", "ranking"), ("status", "duplicate")))
    rejected = ("tuneloop_feedback_events_total", (("kind", "pairwise"), ("status", "rejected")))
    by_field = ("tuneloop_feedback_rejections_total", (("field", "marks[].criterion"),))
    produced = ("tuneloop_feedback_produce_duration_seconds_count", ())
    keys = (accepted, duplicate, rejected, by_field, produced)
    before = _scrape(served.metrics_port)

    event = ranking()
    stub.SubmitBatch(feedback_pb2.SubmitBatchRequest(events=[event, event]), timeout=10)
    bad = pairwise(criteria=["tone"])
    bad.marks.add(criterion="length")
    with pytest.raises(grpc.RpcError):
        stub.Submit(bad, timeout=10)

    after = _scrape(served.metrics_port)
    assert {k: after[k] - before.get(k, 0.0) for k in keys} == dict.fromkeys(keys, 1.0)
    assert after[("tuneloop_feedback_grpc_requests_total", (("code", "INVALID_ARGUMENT"), ("method", "Submit")))] >= 1


def test_main_exits_2_naming_a_bad_setting(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("TUNELOOP_FEEDBACK_PRODUCE_TIMEOUT_S", "-1")
    with pytest.raises(SystemExit) as exit_info:
        main(port=0, metrics_port=0)
    assert exit_info.value.code == 2
    assert "TUNELOOP_FEEDBACK_PRODUCE_TIMEOUT_S" in capsys.readouterr().err


def test_the_service_process_serves_then_drains_and_exits_0_on_sigterm(
    kafka_bootstrap: str, unique_topic: str, tmp_path: Path
) -> None:
    port = free_port()
    env = {
        **os.environ,
        "TUNELOOP_KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "TUNELOOP_FEEDBACK_TOPIC": unique_topic,
        "TUNELOOP_FEEDBACK_HOST": "127.0.0.1",
    }
    code = f"from tuneloop.feedback.server import main; main(port={port}, metrics_port=0)"
    with (tmp_path / "feedback.log").open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        grpc.channel_ready_future(channel).result(timeout=60)
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="tuneloop.v1.Feedback"), timeout=10
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        event = pairwise()
        assert feedback_pb2_grpc.FeedbackStub(channel).Submit(event, timeout=10).status == ACCEPTED
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, (tmp_path / "feedback.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert stored_ids(kafka_bootstrap, unique_topic) == {event.event_id: 1}
