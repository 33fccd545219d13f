"""The v1 contracts and the shared gRPC runtime: generated code is fresh, every message and
field is documented, and a real server answers with health, reflection, metrics and
precise errors."""

from __future__ import annotations

import filecmp
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tuneloop.common.errors import FieldError, abort_invalid, field_of
from tuneloop.common.grpc_client import make_channel
from tuneloop.common.grpc_server import GrpcServer
from tuneloop.v1 import completion_pb2, reward_pb2, reward_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_proto.py"), str(tmp_path)], check=True)
    committed = ROOT / "services" / "v1"
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(p.name for p in committed.iterdir() if p.name != "__pycache__")
    _, mismatch, errors = filecmp.cmpfiles(tmp_path, committed, names, shallow=False)
    assert not mismatch and not errors, f"stale generated code, run `make proto`: {mismatch or errors}"


def test_every_message_and_field_is_commented() -> None:
    """Other teams code against these files: an undocumented field is a bug."""
    undocumented = []
    for proto in sorted((ROOT / "protos" / "tuneloop" / "v1").glob("*.proto")):
        lines = proto.read_text().splitlines()
        for i, line in enumerate(lines):
            s = line.strip()
            is_decl = s.startswith(("message ", "enum ", "service ", "rpc ", "oneof ")) or (
                "=" in s and s.endswith(";") and not s.startswith(("syntax", "option", "package", "import", "//"))
            )
            if is_decl and not lines[i - 1].strip().startswith("//"):
                undocumented.append(f"{proto.name}:{i + 1}: {s}")
    assert not undocumented, "\n".join(undocumented)


class _LengthReward(reward_pb2_grpc.RewardServicer):
    """A minimal servicer exercising the runtime: scores a response by its length."""

    def Score(self, request: reward_pb2.ScoreRequest, context: grpc.ServicerContext) -> reward_pb2.ScoreResponse:
        if not request.items:
            abort_invalid(context, FieldError("items", "must hold at least one item"))
        if request.model == "slow":
            time.sleep(0.5)
        return reward_pb2.ScoreResponse(
            scores=[float(len(i.response)) for i in request.items],
            model=completion_pb2.ModelVersion(name="length", version="v0"),
        )


def _register(server: grpc.Server) -> list[str]:
    reward_pb2_grpc.add_RewardServicer_to_server(_LengthReward(), server)
    return [reward_pb2.DESCRIPTOR.services_by_name["Reward"].full_name]


@pytest.fixture
def server():
    with GrpcServer("contracttest", _register, port=0, metrics_port=0, host="127.0.0.1") as s:
        yield s


def test_round_trip_health_reflection_metrics(server: GrpcServer) -> None:
    channel = make_channel(f"127.0.0.1:{server.port}", "tuneloop.v1.Reward")
    health = health_pb2_grpc.HealthStub(channel)
    status = health.Check(health_pb2.HealthCheckRequest(service="tuneloop.v1.Reward"), timeout=5).status
    assert status == health_pb2.HealthCheckResponse.SERVING

    stub = reward_pb2_grpc.RewardStub(channel)
    item = reward_pb2.ScoreItem(
        prompt=completion_pb2.Prompt(
            chat=completion_pb2.Conversation(messages=[completion_pb2.ChatMessage(role="user", content="hi")])
        ),
        response="hello",
    )
    reply = stub.Score(reward_pb2.ScoreRequest(items=[item, item]), timeout=5)
    assert list(reply.scores) == [5.0, 5.0] and reply.model.name == "length"

    with pytest.raises(grpc.RpcError) as err:
        stub.Score(reward_pb2.ScoreRequest(), timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_of(err.value) == "items"

    with pytest.raises(grpc.RpcError) as err:
        stub.Score(reward_pb2.ScoreRequest(items=[item], model="slow"), timeout=0.1)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    answer = next(iter(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))))
    listed = {s.name for s in answer.list_services_response.service}
    assert {"tuneloop.v1.Reward", "grpc.health.v1.Health"} <= listed

    time.sleep(0.6)  # let the slow call finish so its metric is recorded
    body = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5).read().decode()
    assert 'tuneloop_contracttest_grpc_requests_total{code="OK",method="Score"} 1.0' in body
    assert 'tuneloop_contracttest_grpc_requests_total{code="DEADLINE_EXCEEDED",method="Score"} 1.0' in body
    assert 'tuneloop_contracttest_grpc_requests_total{code="INVALID_ARGUMENT",method="Score"} 1.0' in body
    assert 'tuneloop_contracttest_grpc_request_duration_seconds_count{method="Score"}' in body


def test_stop_drains_in_flight_calls_and_reports_not_serving() -> None:
    server = GrpcServer("draintest", _register, port=0, host="127.0.0.1").start()
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    stub = reward_pb2_grpc.RewardStub(channel)
    item = reward_pb2.ScoreItem(prompt=completion_pb2.Prompt(raw="p"), response="abc")
    in_flight = stub.Score.future(reward_pb2.ScoreRequest(items=[item], model="slow"), timeout=10)
    time.sleep(0.1)
    server.stop(grace=5)
    assert list(in_flight.result().scores) == [3.0]  # the call in flight finished
    with pytest.raises(grpc.RpcError):
        stub.Score(reward_pb2.ScoreRequest(items=[item]), timeout=1)
