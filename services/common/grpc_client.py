"""gRPC channels with retries and deadlines set by gRPC's own service config, so every
client of a tuneloop service retries the same way (UNAVAILABLE only: safe to repeat)."""

from __future__ import annotations

import json

import grpc


def retry_service_config(service: str, attempts: int = 4, timeout_s: float | None = None) -> str:
    policy = {
        "maxAttempts": attempts,
        "initialBackoff": "0.1s",
        "maxBackoff": "2s",
        "backoffMultiplier": 2,
        "retryableStatusCodes": ["UNAVAILABLE"],
    }
    method: dict = {"name": [{"service": service}], "retryPolicy": policy, "waitForReady": False}
    if timeout_s is not None:
        method["timeout"] = f"{timeout_s}s"
    return json.dumps({"methodConfig": [method]})


def channel_options(service: str, attempts: int = 4, timeout_s: float | None = None) -> list[tuple[str, object]]:
    return [
        ("grpc.enable_retries", 1),
        ("grpc.service_config", retry_service_config(service, attempts, timeout_s)),
        ("grpc.max_receive_message_length", 16 * 1024 * 1024),
        ("grpc.max_send_message_length", 16 * 1024 * 1024),
    ]


def make_channel(target: str, service: str, attempts: int = 4, timeout_s: float | None = None) -> grpc.Channel:
    """An insecure channel to `target` (host:port) for the full service name `service`."""
    return grpc.insecure_channel(target, options=channel_options(service, attempts, timeout_s))


def make_aio_channel(target: str, service: str, attempts: int = 4, timeout_s: float | None = None) -> grpc.aio.Channel:
    """The asyncio flavour of `make_channel`, for async servers such as the gateway."""
    return grpc.aio.insecure_channel(target, options=channel_options(service, attempts, timeout_s))
