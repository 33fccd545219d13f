"""Prometheus interceptor for gRPC servers: requests by method and status code, latency
histograms, in-flight calls. Names follow `tuneloop_<service>_grpc_...`."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import grpc
from prometheus_client import Counter, Gauge, Histogram

# Latency buckets from 1 ms to 2 min: generation calls are long, health checks short.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

_metrics: dict[str, tuple[Counter, Histogram, Gauge]] = {}


def grpc_metrics(service: str) -> tuple[Counter, Histogram, Gauge]:
    """The (requests, latency, in-flight) metrics of one service, created once per process."""
    if service not in _metrics:
        p = f"tuneloop_{service}_grpc"
        _metrics[service] = (
            Counter(f"{p}_requests_total", "gRPC calls handled.", ["method", "code"]),
            Histogram(f"{p}_request_duration_seconds", "gRPC call latency.", ["method"], buckets=BUCKETS),
            Gauge(f"{p}_requests_in_flight", "gRPC calls being handled.", ["method"]),
        )
    return _metrics[service]


def _code_of(context: grpc.ServicerContext, error: BaseException | None) -> str:
    code = context.code()
    if code is not None:
        return code.name
    if isinstance(error, GeneratorExit) or not context.is_active():
        # The client went away (or its deadline passed) before the answer was delivered.
        remaining = context.time_remaining()
        expired = remaining is not None and remaining <= 0
        return (grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED).name
    return (grpc.StatusCode.UNKNOWN if error is not None else grpc.StatusCode.OK).name


class MetricsInterceptor(grpc.ServerInterceptor):
    """Counts and times every call; also refuses calls whose deadline already passed."""

    def __init__(self, service: str) -> None:
        self.requests, self.latency, self.in_flight = grpc_metrics(service)

    def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        method = details.method.rsplit("/", 1)[-1]
        if handler.unary_unary:
            return handler._replace(unary_unary=self._wrap_unary(handler.unary_unary, method))
        if handler.stream_unary:
            return handler._replace(stream_unary=self._wrap_unary(handler.stream_unary, method))
        if handler.unary_stream:
            return handler._replace(unary_stream=self._wrap_stream(handler.unary_stream, method))
        return handler._replace(stream_stream=self._wrap_stream(handler.stream_stream, method))

    @contextmanager
    def _measured(self, method: str, context: grpc.ServicerContext) -> Iterator[None]:
        """One call, from its start to its end (for a stream: until its last message is taken
        or the client leaves), counted with the status it ended with."""
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed before the call started")
        self.in_flight.labels(method).inc()
        start = time.perf_counter()
        error = None
        try:
            yield
        except BaseException as e:
            error = e
            raise
        finally:
            self.in_flight.labels(method).dec()
            self.latency.labels(method).observe(time.perf_counter() - start)
            self.requests.labels(method, _code_of(context, error)).inc()

    def _wrap_unary(self, fn: Callable, method: str) -> Callable:
        def wrapped(request: Any, context: grpc.ServicerContext) -> Any:
            with self._measured(method, context):
                return fn(request, context)

        return wrapped

    def _wrap_stream(self, fn: Callable, method: str) -> Callable:
        def wrapped(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            with self._measured(method, context):
                yield from fn(request, context)

        return wrapped
