"""The Reward service's own Prometheus metrics (gRPC call counts and latencies come from
the shared interceptor as tuneloop_reward_grpc_*). Created once per process: tests run
several servers in one."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

BATCH_SIZE = Histogram(
    "tuneloop_reward_batch_size",
    "Pairs scored in one forward pass (dynamic batching across concurrent calls).",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
)
INFERENCE_SECONDS = Histogram(
    "tuneloop_reward_inference_seconds",
    "Time to score one batch (model forward pass or judge calls).",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
QUEUE_SECONDS = Histogram(
    "tuneloop_reward_queue_seconds",
    "Time a call's pairs waited for their batch to start.",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
# Scores of every served pair by model version: a shifting distribution under one version
# is drift in what is being scored; a jump at a swap is the new model's scale.
SCORE = Histogram(
    "tuneloop_reward_score",
    "Scores returned, by model version.",
    ["model"],
    buckets=(-10, -5, -3, -2, -1, -0.5, 0, 0.5, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10),
)
MODEL_INFO = Gauge(
    "tuneloop_reward_model_info", "1 for the model version being served, 0 for ones swapped out.", ["backend", "model"]
)
SWAPS = Counter("tuneloop_reward_model_swaps_total", "Hot swaps to a newly promoted reward model version.")
LOAD_FAILURES = Counter(
    "tuneloop_reward_model_load_failures_total", "Reward model versions that failed to load (the old one stays)."
)
