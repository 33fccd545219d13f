"""Helpers of the Generation tests: a registry of two tiny policies, a served Generation, reading the completion log."""

from __future__ import annotations

import time
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tuneloop.common.grpc_client import make_channel
from tuneloop.common.kafka import COMPLETIONS_TOPIC, KafkaSettings, make_consumer
from tuneloop.common.processes import ServiceProcess
from tuneloop.common.registry import Registry
from tuneloop.generation.server import SERVICE_NAME
from tuneloop.v1 import completion_pb2, generation_pb2, generation_pb2_grpc


def make_registry(root: Path, policies: tuple[Path, Path]) -> Registry:
    """policy@v0001 (promoted to production) and policy@v0002 (registered only)."""
    registry = Registry(root)
    first = registry.register("policy", policies[0], kind="policy")
    registry.promote("policy", first.version)
    registry.register("policy", policies[1], kind="policy", parent=first.ref)
    return registry


@dataclass
class Served:
    """A running Generation server, however it was started."""

    engine: str
    target: str
    metrics_port: int
    registry: Registry

    def stub(self) -> generation_pb2_grpc.GenerationStub:
        return generation_pb2_grpc.GenerationStub(make_channel(self.target, SERVICE_NAME))

    def metric(self, name: str, **labels: str) -> float:
        return scrape(self.metrics_port, name, **labels)


@contextmanager
def serve_vllm(registry: Registry, root: Path, kafka_bootstrap: str, **env: str) -> Iterator[Served]:
    """`tuneloop serve generation` with the vLLM engine as a process, serving policy@production;
    `env` adds or overrides settings."""
    process = ServiceProcess("generation", env={
        "TUNELOOP_REGISTRY_ROOT": str(registry.root),
        "TUNELOOP_KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "TUNELOOP_GENERATION_ENGINE": "vllm",
        "TUNELOOP_GENERATION_HOST": "127.0.0.1",
        "TUNELOOP_GENERATION_MODEL": "policy@production",
        "TUNELOOP_GENERATION_SPOOL_PATH": str(root / "spool"),
        "TUNELOOP_GENERATION_VLLM_KV_CACHE_BYTES": str(256 << 20),
        **env,
    }, log_dir=root)
    process.start(timeout=600)
    try:
        assert process.metrics_port is not None
        yield Served("vllm", process.target, process.metrics_port, registry)
    finally:
        assert process.stop() == 0, process.log_tail()


def scrape(port: int, name: str, **labels: str) -> float:
    """A sample's value from a /metrics endpoint (0 when absent)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def wait_for(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def raw(text: str, **sampling: object) -> generation_pb2.GenerateRequest:
    return generation_pb2.GenerateRequest(
        prompt=completion_pb2.Prompt(raw=text), sampling=completion_pb2.SamplingParams(**sampling)
    )


def chat(text: str, **sampling: object) -> generation_pb2.GenerateRequest:
    conversation = completion_pb2.Conversation(messages=[completion_pb2.ChatMessage(role="user", content=text)])
    return generation_pb2.GenerateRequest(
        prompt=completion_pb2.Prompt(chat=conversation), sampling=completion_pb2.SamplingParams(**sampling)
    )


def read_records(
    bootstrap: str, ids: Iterable[str], timeout_s: float = 60.0, topic: str = COMPLETIONS_TOPIC
) -> list[completion_pb2.CompletionRecord]:
    """Every record of `topic` whose id is in `ids`, in log order (duplicates kept); waits
    until all ids were seen."""
    wanted = set(ids)
    consumer = make_consumer(KafkaSettings(bootstrap_servers=bootstrap), f"test-{uuid.uuid4().hex}", [topic])
    found: list[completion_pb2.CompletionRecord] = []
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not wanted <= {r.completion_id for r in found}:
            for records in consumer.poll(timeout_ms=500).values():
                for record in records:
                    parsed = completion_pb2.CompletionRecord.FromString(record.value)
                    if parsed.completion_id in wanted:
                        assert record.key == parsed.conversation_id.encode()
                        found.append(parsed)
        # Drain a little longer so that duplicates would show.
        for records in consumer.poll(timeout_ms=1000).values():
            for record in records:
                parsed = completion_pb2.CompletionRecord.FromString(record.value)
                if parsed.completion_id in wanted:
                    found.append(parsed)
    finally:
        consumer.close()
    missing = wanted - {r.completion_id for r in found}
    assert not missing, f"{len(missing)} completion records never reached Kafka: {sorted(missing)[:5]}"
    return found


def rpc_error(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


