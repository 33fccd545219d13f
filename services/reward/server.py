"""The Reward service: `Reward.Score` over the promoted reward model (or an LLM judge),
with dynamic batching across concurrent calls and hot swap when the registry alias moves.

One call's path: validate every field (INVALID_ARGUMENT naming the first bad one) → pick
the scorer (the served version, or the one the call pins) → encode each pair in the calling
thread with `reward_format.encode` → wait for the batching thread to score it together
with whatever else arrived → answer the scores and the version that produced them.
"""

from __future__ import annotations

import sys
import uuid

import grpc

from tuneloop.common.errors import FieldError, abort_invalid
from tuneloop.common.grpc_server import GrpcServer, serving_options
from tuneloop.common.kafka import KafkaSettings
from tuneloop.common.kafka_acls import REWARD_WATCH_GROUP_PREFIX
from tuneloop.common.logs import configure_logging
from tuneloop.common.registry import NotFoundError, Registry, RegistryError, RegistrySettings
from tuneloop.common.settings import load_or_exit
from tuneloop.reward import metrics
from tuneloop.reward.batching import Batcher
from tuneloop.reward.formatting import items_of
from tuneloop.reward.judge import JudgeCatalog, JudgeError, JudgeScorer
from tuneloop.reward.scorer import Catalog, ModelCatalog, Unavailable, model_label
from tuneloop.reward.settings import RewardSettings
from tuneloop.v1 import reward_pb2, reward_pb2_grpc

SERVICE = reward_pb2.DESCRIPTOR.services_by_name["Reward"].full_name


class RewardService(reward_pb2_grpc.RewardServicer):
    def __init__(self, settings: RewardSettings, catalog: Catalog, batcher: Batcher) -> None:
        self.settings = settings
        self.catalog = catalog
        self.batcher = batcher

    def Score(self, request: reward_pb2.ScoreRequest, context: grpc.ServicerContext) -> reward_pb2.ScoreResponse:
        s = self.settings
        try:
            pairs = items_of(request, s.max_request_items, s.max_prompt_chars, s.max_response_chars)
            scorer = self.catalog.get(request.model)
            prepared = [scorer.prepare(p, r, f"items[{i}]") for i, (p, r) in enumerate(pairs)]
        except FieldError as err:
            abort_invalid(context, err)
        except NotFoundError as err:
            context.abort(grpc.StatusCode.NOT_FOUND, str(err))
        except Unavailable as err:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(err))
        try:
            scores = self.batcher.score(scorer, prepared, context.time_remaining())
        except TimeoutError as err:
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(err))
        except Unavailable as err:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(err))
        except JudgeError as err:
            context.abort(grpc.StatusCode.INTERNAL, str(err))
        histogram = metrics.SCORE.labels(model_label(scorer.version))
        for value in scores:
            histogram.observe(value)
        return reward_pb2.ScoreResponse(scores=scores, model=scorer.version)


class RewardServer(GrpcServer):
    """The gRPC server with its scorer catalog and batcher; health is NOT_SERVING until a
    reward model is loaded (e.g. while none has been promoted yet)."""

    def __init__(self, settings: RewardSettings, catalog: Catalog) -> None:
        self.catalog = catalog
        self.batcher = Batcher(settings.max_batch_size, settings.batch_window_ms / 1000)
        self.servicer = RewardService(settings, catalog, self.batcher)

        def register(server: grpc.Server) -> list[str]:
            reward_pb2_grpc.add_RewardServicer_to_server(self.servicer, server)
            return [SERVICE]

        super().__init__("reward", register, **serving_options(settings), on_stop=self._close)

    def start(self) -> RewardServer:
        self.catalog.start(on_ready=lambda: self.set_serving(True))
        super().start()
        self.set_serving(self.catalog.ready)
        return self

    def _close(self) -> None:
        self.catalog.close()
        self.batcher.close()


def build_server(settings: RewardSettings, registry: Registry, kafka: KafkaSettings | None = None) -> RewardServer:
    """A server ready to `.start()` (tests) or `.run_forever()` (the process); with `kafka`
    (and `alias_events`), model events wake the alias follower at once."""
    if settings.backend == "judge":
        catalog: Catalog = JudgeCatalog(JudgeScorer.from_settings(settings))
    else:
        if settings.torch_threads:
            import torch

            torch.set_num_threads(settings.torch_threads)
        events = kafka if settings.alias_events else None
        catalog = ModelCatalog(
            settings.model,
            registry,
            device=settings.device,
            max_tokens=settings.max_tokens,
            max_pinned=settings.max_loaded_models,
            poll_s=settings.alias_poll_s,
            kafka=events,
            group_id=f"{REWARD_WATCH_GROUP_PREFIX}{uuid.uuid4().hex[:12]}" if events is not None else None,
        )
    return RewardServer(settings, catalog)


def main(port: int | None = None, metrics_port: int | None = None, model: str | None = None) -> None:
    """`tuneloop serve reward`: serve until SIGTERM, then drain calls."""
    settings = load_or_exit(RewardSettings, port=port, metrics_port=metrics_port, model=model)
    registry = Registry.from_settings(load_or_exit(RegistrySettings))
    kafka = load_or_exit(KafkaSettings)
    configure_logging("reward", settings.log_level)
    try:
        # Kafka is optional here: only brokers named in the environment are followed.
        server = build_server(settings, registry, kafka if "bootstrap_servers" in kafka.model_fields_set else None)
    except RegistryError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    server.run_forever()
