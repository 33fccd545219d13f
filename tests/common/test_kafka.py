"""The shared Kafka clients against a real broker: delivery, commits, topics, offsets, restarts."""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path

import pytest
from kafka import KafkaConsumer, TopicPartition
from kafka.structs import OffsetAndMetadata
from tuneloop.common import local_kafka
from tuneloop.common.kafka import (
    KafkaSettings,
    OffsetSnapshot,
    end_offsets,
    ensure_topics,
    make_consumer,
    make_producer,
    serves,
    snapshot_offsets,
)
from tuneloop.common.local_kafka import BrokerError, LocalBroker, free_port
from tuneloop.common.native_producer import DeliveryFailed, NativeProducer
from typer.testing import CliRunner

# A guard against hanging, not a timing assertion: a healthy broker delivers in well under a second.
POLL_GUARD_S = 60.0


def drain(consumer: KafkaConsumer, count: int) -> list:
    """Poll until `count` records arrived (or the guard expires), then one more empty poll's worth."""
    records: list = []
    deadline = time.monotonic() + POLL_GUARD_S
    while len(records) < count and time.monotonic() < deadline:
        for batch in consumer.poll(timeout_ms=500).values():
            records.extend(batch)
    # Anything beyond `count` would be a duplicate or a stray: give it a chance to show up.
    for batch in consumer.poll(timeout_ms=500).values():
        records.extend(batch)
    return records


def test_keyed_records_keep_order_and_a_second_consumer_resumes_after_the_commit(
    kafka_settings: KafkaSettings, unique_topic: str
) -> None:
    ensure_topics(kafka_settings, [unique_topic])
    producer = make_producer(kafka_settings)
    assert producer.config["enable_idempotence"] and producer.config["acks"] == -1
    keys = [b"prompt-a", b"prompt-b", b"prompt-c", b"prompt-d"]
    for seq in range(40):
        producer.send(unique_topic, key=keys[seq % 4], value=f"{seq}".encode())
    producer.flush()
    producer.close()

    first = make_consumer(kafka_settings, "resume-group", [unique_topic])
    seen = drain(first, 40)
    assert len(seen) == 40
    by_key: dict[bytes, list[int]] = defaultdict(list)
    for record in seen:
        by_key[record.key].append(int(record.value))
    assert dict(by_key) == {k: list(range(i, 40, 4)) for i, k in enumerate(keys)}

    # Process only the first half of every partition, commit exactly that, then go away.
    per_partition: dict[int, list[int]] = defaultdict(list)
    for record in seen:
        per_partition[record.partition].append(record.offset)
    committed = {p: len(offsets) // 2 for p, offsets in per_partition.items()}
    first.commit({TopicPartition(unique_topic, p): OffsetAndMetadata(o, "", -1) for p, o in committed.items()})
    first.close()

    second = make_consumer(kafka_settings, "resume-group", [unique_topic])
    rest = drain(second, 40 - sum(committed.values()))
    second.close()
    assert sorted((r.partition, r.offset) for r in rest) == sorted(
        (p, o) for p, offsets in per_partition.items() for o in offsets if o >= committed[p]
    )


def test_the_native_producer_puts_each_key_where_kafka_python_does(
    kafka_settings: KafkaSettings, unique_topic: str
) -> None:
    """The Feedback service produces through librdkafka, other writers and tests through
    kafka-python: one key must land in one partition whichever wrote it (librdkafka's default
    partitioner would not), and every delivery is reported once."""
    ensure_topics(kafka_settings.model_copy(update={"partitions": 4}), [unique_topic])
    keys = [f"item-{i}".encode() for i in range(40)]
    native = NativeProducer(kafka_settings)
    delivered: list[Exception | None] = []
    for key in keys:
        native.send(unique_topic, key, b"native", delivered.append)
    assert native.close(30) == 0
    assert delivered == [None] * len(keys)
    python = make_producer(kafka_settings)
    for key in keys:
        python.send(unique_topic, key=key, value=b"python")
    python.flush()
    python.close()

    consumer = KafkaConsumer(bootstrap_servers=kafka_settings.bootstrap_servers, auto_offset_reset="earliest")
    consumer.assign([TopicPartition(unique_topic, p) for p in range(4)])
    records = drain(consumer, 2 * len(keys))
    consumer.close()
    where: dict[bytes, dict[bytes, int]] = defaultdict(dict)
    for record in records:
        where[record.value][record.key] = record.partition
    assert len(records) == 2 * len(keys)
    assert where[b"native"] == where[b"python"]
    assert len(set(where[b"native"].values())) > 1


def test_the_native_producer_refuses_a_topic_that_does_not_exist(kafka_settings: KafkaSettings) -> None:
    native = NativeProducer(kafka_settings)
    try:
        with pytest.raises(DeliveryFailed, match="no-such-topic"):
            native.partitions_for("tuneloop.test.no-such-topic", timeout_s=10)
    finally:
        native.close(0)


def test_ensure_topics_creates_once_and_waits_for_leaders(kafka_settings: KafkaSettings, unique_topic: str) -> None:
    other = unique_topic + ".other"
    assert ensure_topics(kafka_settings, [unique_topic, other]) == {unique_topic, other}
    assert ensure_topics(kafka_settings, [unique_topic, other]) == set()
    # Leaders are in place when ensure_topics returns: every partition answers ListOffsets.
    assert end_offsets(kafka_settings, unique_topic) == {p: 0 for p in range(kafka_settings.partitions)}


def test_snapshot_offsets_count_records_per_partition(kafka_settings: KafkaSettings, unique_topic: str) -> None:
    ensure_topics(kafka_settings, [unique_topic])
    assert snapshot_offsets(kafka_settings, unique_topic).offsets == {0: 0, 1: 0, 2: 0}
    producer = make_producer(kafka_settings)
    for partition, count in {0: 3, 2: 5}.items():
        for _ in range(count):
            producer.send(unique_topic, value=b"x", partition=partition)
    producer.flush()
    producer.close()

    snapshot = snapshot_offsets(kafka_settings, unique_topic)
    assert snapshot.offsets == {0: 3, 1: 0, 2: 5}
    assert snapshot.id == f"{unique_topic}@0:3,1:0,2:5"
    assert OffsetSnapshot.parse(snapshot.id) == snapshot


def test_consumers_and_snapshots_see_only_committed_transactions(
    kafka_settings: KafkaSettings, unique_topic: str
) -> None:
    ensure_topics(kafka_settings.model_copy(update={"partitions": 1}), [unique_topic])
    producer = make_producer(kafka_settings, transactional_id=f"txn-{unique_topic}")
    producer.init_transactions()

    producer.begin_transaction()
    for value in (b"c1", b"c2", b"c3"):
        producer.send(unique_topic, value=value)
    producer.flush()
    # Written but open: a snapshot taken now must not include it.
    assert end_offsets(kafka_settings, unique_topic) == {0: 0}
    producer.commit_transaction()

    producer.begin_transaction()
    producer.send(unique_topic, value=b"aborted")
    producer.flush()
    producer.abort_transaction()
    producer.close()

    # 3 committed records, their commit marker, 1 aborted record, its abort marker.
    assert end_offsets(kafka_settings, unique_topic) == {0: 6}
    consumer = make_consumer(kafka_settings, "txn-reader", [unique_topic])
    values = [r.value for r in drain(consumer, 3)]
    consumer.close()
    assert values == [b"c1", b"c2", b"c3"]


@pytest.mark.parametrize("bad", ["", "topic", "topic@", "topic@0", "topic@0:1,", "topic@a:1", "bad topic@0:1"])
def test_snapshot_id_rejects_malformed_text(bad: str) -> None:
    with pytest.raises(ValueError):
        OffsetSnapshot.parse(bad)


@pytest.mark.parametrize("crash", [False, pytest.param(True, marks=pytest.mark.heavy)], ids=["stop", "crash"])
def test_no_acknowledged_record_is_lost_across_a_broker_restart(
    kafka_broker: LocalBroker, kafka_settings: KafkaSettings, unique_topic: str, crash: bool
) -> None:
    ensure_topics(kafka_settings, [unique_topic])
    producer = make_producer(kafka_settings)
    before = [producer.send(unique_topic, key=b"k", value=f"{i}".encode()) for i in range(50)]
    producer.flush()
    assert all(f.get().offset >= 0 for f in before)

    if crash:
        kafka_broker.kill()
    else:
        kafka_broker.stop()
    # Sent while the broker is down: buffered, retried after it is back, delivered once.
    during = [producer.send(unique_topic, key=b"k", value=f"{i}".encode()) for i in range(50, 70)]
    kafka_broker.start()
    producer.flush()
    assert all(f.get().offset >= 0 for f in during)
    producer.close()

    consumer = make_consumer(kafka_settings, "restart-check", [unique_topic])
    values = [int(r.value) for r in drain(consumer, 70)]
    consumer.close()
    assert values == list(range(70))


def test_broker_reports_missing_jars_instead_of_hanging(tmp_path: Path) -> None:
    broker = LocalBroker(tmp_path / "data", home=tmp_path / "no-such-home")
    with pytest.raises(BrokerError, match="tuneloop kafka install"):
        broker.start()
    assert not broker.running


def test_nothing_serves_on_a_free_port() -> None:
    assert not serves(f"127.0.0.1:{free_port()}", timeout_s=0.5)


def test_cli_starts_a_background_broker_that_status_and_stop_find(tmp_path: Path) -> None:
    runner = CliRunner()
    data_dir = str(tmp_path / "cli-broker")
    port, cport = free_port(), free_port()
    started = runner.invoke(
        local_kafka.cli, ["start", "--port", str(port), "--controller-port", str(cport), "--data-dir", data_dir]
    )
    try:
        assert started.exit_code == 0, started.output
        assert started.stdout.strip() == f"127.0.0.1:{port}"
        status = runner.invoke(local_kafka.cli, ["status", "--data-dir", data_dir])
        assert status.exit_code == 0 and "serving at" in status.stdout
    finally:
        stopped = runner.invoke(local_kafka.cli, ["stop", "--data-dir", data_dir])
    assert stopped.exit_code == 0, stopped.output
    assert not serves(f"127.0.0.1:{port}", timeout_s=0.5)
    assert runner.invoke(local_kafka.cli, ["status", "--data-dir", data_dir]).exit_code == 1
