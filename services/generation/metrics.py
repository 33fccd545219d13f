"""Prometheus metrics of the Generation service, created once per process.

Request counts and latencies per method come from the shared gRPC interceptor
(`tuneloop_generation_grpc_request_duration_seconds`); these cover what only this service knows.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

TIME_TO_FIRST_TOKEN = Histogram(
    "tuneloop_generation_time_to_first_token_seconds",
    "From receiving a request to its first generated text.",
    buckets=_LATENCY,
)
TOKENS_GENERATED = Counter("tuneloop_generation_tokens_generated_total", "Tokens generated, all candidates.")
PROMPT_TOKENS = Counter("tuneloop_generation_prompt_tokens_total", "Tokens in rendered prompts.")
BATCH_SIZE = Histogram(
    "tuneloop_generation_batch_size",
    "Most candidates one batch held at once, requests that joined it while it ran included (transformers engine).",
    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 128, 256),
)
COMPLETIONS = Counter(
    "tuneloop_generation_completions_total", "Candidates finished, by finish reason.", ["finish_reason"]
)
REFUSED = Counter(
    "tuneloop_generation_requests_refused_total",
    "Requests refused before generating, by reason.",
    ["reason"],
)

SPOOL_RECORDS = Gauge(
    "tuneloop_generation_completion_spool_records",
    "Completion records in the local spool that Kafka has not acknowledged yet.",
)
SPOOL_BYTES = Gauge("tuneloop_generation_completion_spool_bytes", "Size of the completion spool file.")
QUEUE_RECORDS = Gauge(
    "tuneloop_generation_completion_queue_records", "Completion records waiting in memory for the publisher."
)
PUBLISHED = Counter(
    "tuneloop_generation_completions_published_total", "Completion records acknowledged by Kafka."
)
SPOOLED = Counter("tuneloop_generation_completions_spooled_total", "Completion records written to the spool.")

MODEL_INFO = Gauge(
    "tuneloop_generation_model_info",
    "The served model version (value 1).",
    ["name", "version", "engine"],
)
SWAPS = Counter("tuneloop_generation_model_swaps_total", "Model swaps, by result.", ["result"])
SWAP_SECONDS = Histogram(
    "tuneloop_generation_model_swap_duration_seconds",
    "Time to load and switch to a promoted version.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)


def set_model_info(name: str, version: str, engine: str) -> None:
    MODEL_INFO.clear()
    MODEL_INFO.labels(name=name, version=version, engine=engine).set(1)
