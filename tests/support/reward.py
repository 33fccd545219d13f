"""Helpers of the Reward tests: scores computed in process, a server on free ports, requests and metrics."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
from prometheus_client import REGISTRY
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from tuneloop.common import reward_format as rf
from tuneloop.common.registry import Registry
from tuneloop.reward.formatting import to_proto_prompt
from tuneloop.reward.server import RewardServer, build_server
from tuneloop.reward.settings import RewardSettings
from tuneloop.v1 import reward_pb2, reward_pb2_grpc


def in_process(folder: Path, prompts: list[Any], responses: list[str]) -> list[float]:
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    rf.prepare_tokenizer(tok, model)
    return rf.score_pairs(model, tok, prompts, responses)


@contextmanager
def serving(registry: Registry, **settings: Any) -> Iterator[tuple[RewardServer, reward_pb2_grpc.RewardStub]]:
    base = dict(port=0, metrics_port=0, host="127.0.0.1", model="reward@production", alias_poll_s=0.05)
    with build_server(RewardSettings(**{**base, **settings}), registry) as server:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            yield server, reward_pb2_grpc.RewardStub(channel)


def request(prompts: list[Any], responses: list[str], model: str = "") -> reward_pb2.ScoreRequest:
    items = [
        reward_pb2.ScoreItem(prompt=to_proto_prompt(p), response=r) for p, r in zip(prompts, responses, strict=True)
    ]
    return reward_pb2.ScoreRequest(items=items, model=model)


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0
