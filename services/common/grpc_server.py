"""One gRPC server bootstrap for every service: standard health (grpc.health.v1), server
reflection, Prometheus metrics on their own port, and graceful shutdown on SIGTERM
(stop accepting, drain in-flight calls, exit 0)."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from concurrent import futures
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from tuneloop.common.grpc_metrics import MetricsInterceptor
from tuneloop.common.settings import GrpcServiceSettings

log = logging.getLogger(__name__)

# Register servicers on the server and return their full service names (for health and
# reflection), e.g. [feedback_pb2.DESCRIPTOR.services_by_name["Feedback"].full_name].
Registrar = Callable[[grpc.Server], list[str]]

MAX_MESSAGE_BYTES = 16 * 1024 * 1024


def serving_options(settings: GrpcServiceSettings) -> dict[str, Any]:
    """`GrpcServer`'s keyword arguments from a service's serving settings."""
    return {
        "port": settings.port,
        "metrics_port": settings.metrics_port,
        "host": settings.host,
        "max_workers": settings.max_workers,
        "grace_seconds": settings.grace_seconds,
        "max_concurrent_rpcs": settings.max_open_calls,
    }


class GrpcServer:
    """A started gRPC server with its health, reflection and metrics endpoints.

    Usable in-process (tests start several) or as a process main via `run_forever`.
    """

    def __init__(
        self,
        service: str,
        register: Registrar,
        port: int,
        metrics_port: int | None = None,
        host: str = "0.0.0.0",
        max_workers: int = 32,
        grace_seconds: float = 20.0,
        on_stop: Callable[[], None] | None = None,
        max_concurrent_rpcs: int | None = None,
    ) -> None:
        self.service = service
        self.grace_seconds = grace_seconds
        self._on_stop = on_stop
        self._stopped = threading.Event()
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix=f"{service}-rpc"),
            interceptors=[MetricsInterceptor(service)],
            # Beyond this many open calls gRPC answers RESOURCE_EXHAUSTED at once instead of
            # queueing without bound behind busy handler threads.
            maximum_concurrent_rpcs=max_concurrent_rpcs,
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.so_reuseport", 0),
            ],
        )
        self.names = register(self.server)
        self.health = health.HealthServicer(experimental_non_blocking=True)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            [*self.names, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server
        )
        self.port = self.server.add_insecure_port(f"{host}:{port}")
        if self.port == 0:
            raise OSError(f"cannot bind gRPC port {host}:{port}")
        self._metrics_http = None
        self.metrics_port = None
        if metrics_port is not None:
            self._metrics_http, _ = start_http_server(metrics_port, addr=host)
            self.metrics_port = self._metrics_http.server_port

    def start(self) -> GrpcServer:
        self.server.start()
        self.set_serving(True)
        log.info("serving", extra={"fields": {"port": self.port, "metrics_port": self.metrics_port}})
        return self

    def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ["", *self.names]:
            self.health.set(name, status)

    def stop(self, grace: float | None = None) -> None:
        """Stop accepting calls, let in-flight calls finish within the grace period."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.set_serving(False)
        self.server.stop(self.grace_seconds if grace is None else grace).wait()
        if self._on_stop is not None:
            self._on_stop()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
        log.info("stopped")

    def run_forever(self) -> None:
        """Serve until SIGTERM or SIGINT, then drain and return (the process exits 0)."""
        done = threading.Event()

        def _signal(signum: int, _frame: object) -> None:
            log.info("shutdown requested", extra={"fields": {"signal": signal.Signals(signum).name}})
            done.set()

        signal.signal(signal.SIGTERM, _signal)
        signal.signal(signal.SIGINT, _signal)
        self.start()
        done.wait()
        self.stop()

    def __enter__(self) -> GrpcServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop(grace=1.0)
