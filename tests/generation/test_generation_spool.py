"""The completion log when Kafka goes away: the local spool, its recovery, and its bound.

Drills use a broker of their own (not the session's), stopped and started by the test.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.support.generation import (
    Served,
    make_registry,
    raw,
    read_records,
    wait_for,
)
from tuneloop.common.local_kafka import LocalBroker, install
from tuneloop.common.kafka import KafkaSettings
from tuneloop.generation.completion_log import CompletionLog
from tuneloop.generation.server import GenerationApp
from tuneloop.generation.settings import GenerationSettings
from tuneloop.generation.spool import Spool, SpoolBusyError
from tuneloop.v1 import completion_pb2


def _payloads(n: int, start: int = 0) -> list[bytes]:
    return [f"record-{i}".encode() * (i % 5 + 1) for i in range(start, start + n)]


# ---- the spool file ---------------------------------------------------------------------


def test_spool_reads_back_in_order_and_survives_reopening(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s", max_bytes=1 << 20)
    spool.append(_payloads(5))
    values, end = spool.read(3)
    assert values == _payloads(3)
    spool.commit(end, 3)
    spool.close()
    again = Spool(tmp_path / "s", max_bytes=1 << 20)
    assert again.pending == 2
    assert again.read(10)[0] == _payloads(2, start=3)


def test_spool_drops_a_torn_tail_and_keeps_what_came_before(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s", max_bytes=1 << 20)
    spool.append(_payloads(3))
    spool.close()
    whole = (tmp_path / "s").stat().st_size
    with open(tmp_path / "s", "ab") as f:  # a crash in the middle of the next append
        f.write(struct.pack(">II", 100, 0) + b"only part of the payl")
    spool = Spool(tmp_path / "s", max_bytes=1 << 20)
    assert spool.pending == 3 and spool.read(10)[0] == _payloads(3)
    assert (tmp_path / "s").stat().st_size == whole
    spool.append(_payloads(1, start=3))  # appends after the cut, not after the garbage
    assert spool.read(10)[0] == _payloads(4)


def test_spool_drops_a_record_whose_checksum_fails(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s", max_bytes=1 << 20)
    spool.append(_payloads(2))
    spool.close()
    data = bytearray((tmp_path / "s").read_bytes())
    data[-1] ^= 0xFF  # a flipped bit in the last payload
    (tmp_path / "s").write_bytes(bytes(data))
    spool = Spool(tmp_path / "s", max_bytes=1 << 20)
    assert spool.pending == 1 and spool.read(10)[0] == _payloads(1)


def test_spool_has_one_writer(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s", max_bytes=1 << 20)
    with pytest.raises(SpoolBusyError):
        Spool(tmp_path / "s", max_bytes=1 << 20)
    spool.close()
    Spool(tmp_path / "s", max_bytes=1 << 20).close()


def test_spool_is_emptied_once_published_and_compacted_while_busy(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s", max_bytes=4096)
    spool.append([b"x" * 1000] * 3)
    values, end = spool.read(3)
    spool.commit(end, 3)
    assert (spool.pending, spool.size, os.path.getsize(tmp_path / "s")) == (0, 0, 0)
    spool.append([bytes([i]) * 1100 for i in range(4)])
    assert spool.full
    _, end = spool.read(3)
    spool.commit(end, 3)  # past half the bound: the published head is dropped
    assert spool.size == 1108 and not spool.full
    assert spool.read(10)[0] == [bytes([3]) * 1100]
    spool.close()
    assert Spool(tmp_path / "s", max_bytes=4096).read(10)[0] == [bytes([3]) * 1100]


# ---- drills with a broker of their own ---------------------------------------------------


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[LocalBroker]:
    broker = LocalBroker(tmp_path / "kafka", home=install())
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


def _record(i: int) -> completion_pb2.CompletionRecord:
    return completion_pb2.CompletionRecord(
        completion_id=f"cmpl-{i:032x}", conversation_id="c", completion=completion_pb2.Completion(text=str(i))
    )


@pytest.mark.timeout(300)
def test_spool_left_by_a_stopped_process_is_flushed_first(tmp_path: Path, own_broker: LocalBroker) -> None:
    kafka = KafkaSettings(bootstrap_servers=own_broker.bootstrap)
    own_broker.stop()
    down = CompletionLog(kafka, Spool(tmp_path / "spool", 1 << 20), send_timeout_s=1, retry_s=0.5).start()
    for i in range(5):
        down.publish(_record(i))
    down.close(timeout_s=1)
    left = Spool(tmp_path / "spool", 1 << 20)
    assert left.pending == 5
    left.close()

    own_broker.start()
    up = CompletionLog(kafka, Spool(tmp_path / "spool", 1 << 20), send_timeout_s=5, retry_s=0.5).start()
    up.publish(_record(5))  # served after the restart: must come after the spooled ones
    wait_for(lambda: up.pending == 0, 60, "the spool to flush")
    up.close()
    records = read_records(own_broker.bootstrap, [_record(i).completion_id for i in range(6)])
    assert [r.completion.text for r in records] == [str(i) for i in range(6)]


@pytest.fixture
def drill_app(
    tmp_path: Path, own_broker: LocalBroker, tiny_policies: tuple[Path, Path], request: pytest.FixtureRequest
) -> Iterator[tuple[Served, GenerationApp]]:
    spool_bytes = getattr(request, "param", 1 << 20)
    settings = GenerationSettings(
        port=0, metrics_port=0, host="127.0.0.1", spool_path=tmp_path / "spool", spool_max_bytes=spool_bytes,
        publish_timeout_s=2, publish_retry_s=0.5, alias_events=False,
    )
    registry = make_registry(tmp_path / "registry", tiny_policies)
    kafka = KafkaSettings(bootstrap_servers=own_broker.bootstrap)
    with GenerationApp(settings, kafka=kafka, registry=registry) as app:
        assert app.server.metrics_port is not None
        yield Served("transformers", app.target, app.server.metrics_port, registry), app


@pytest.mark.timeout(600)
def test_broker_outage_loses_nothing_and_keeps_order(
    own_broker: LocalBroker, drill_app: tuple[Served, GenerationApp]
) -> None:
    served, app = drill_app
    stub = served.stub()

    def ask() -> str:
        request = raw("Cats and dogs", max_tokens=4)
        request.conversation_id = "one-conversation"  # one key, one partition: a total order to check
        return stub.Generate(request, timeout=60).completions[0].completion_id

    served_ids = [ask() for _ in range(2)]
    wait_for(lambda: app.completions.pending == 0, 60, "records to publish while Kafka is up")

    own_broker.stop()
    served_ids += [ask() for _ in range(6)]  # still served while Kafka is down
    wait_for(lambda: served.metric("tuneloop_generation_completion_spool_records") > 0, 60, "records to spool")

    own_broker.start()
    wait_for(lambda: app.completions.pending == 0, 120, "the spool to flush")
    assert served.metric("tuneloop_generation_completion_spool_records") == 0
    served_ids.append(ask())
    records = read_records(own_broker.bootstrap, served_ids)
    assert [r.completion_id for r in records] == served_ids  # in order, none lost, no duplicates


@pytest.mark.timeout(600)
@pytest.mark.parametrize("drill_app", [4096], indirect=True)
def test_full_spool_refuses_new_requests_until_kafka_is_back(
    own_broker: LocalBroker, drill_app: tuple[Served, GenerationApp]
) -> None:
    served, app = drill_app
    stub = served.stub()
    stub.Generate(raw("Cats and dogs", max_tokens=2), timeout=60)
    own_broker.stop()
    refused = None
    for _ in range(500):  # each answer's record goes to the spool until it is full
        try:
            stub.Generate(raw("Cats and dogs", max_tokens=2), timeout=60)
        except grpc.RpcError as err:
            refused = err
            break
        time.sleep(0.05)
    assert refused is not None and refused.code() == grpc.StatusCode.UNAVAILABLE
    assert "spool" in (refused.details() or "")
    assert served.metric("tuneloop_generation_requests_refused_total", reason="completion_log_full") >= 1

    own_broker.start()
    wait_for(lambda: app.completions.accepting, 120, "the spool to drain")
    assert stub.Generate(raw("Cats and dogs", max_tokens=2), timeout=60).completions
