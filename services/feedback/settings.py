"""Settings of the Feedback service, the ingestion side (env: TUNELOOP_FEEDBACK_*).

Kafka itself is configured by `KafkaSettings` (TUNELOOP_KAFKA_*), shared with every client.
"""

from __future__ import annotations

import os

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from tuneloop.common.kafka import FEEDBACK_TOPIC
from tuneloop.common.settings import GrpcServiceSettings, ListenPort, MetricsPort


class FeedbackSettings(GrpcServiceSettings):
    """How the Feedback service validates, deduplicates and writes to Kafka (serving fields:
    GrpcServiceSettings)."""

    # populate_by_name: `store_root` reads the env var the store uses (TUNELOOP_STORE_ROOT)
    # yet stays settable by its name from code and tests.
    model_config = SettingsConfigDict(env_prefix="TUNELOOP_FEEDBACK_", populate_by_name=True)

    port: ListenPort = 50053
    metrics_port: MetricsPort = 9093

    topic: str = Field(FEEDBACK_TOPIC, min_length=1, description="Kafka topic accepted events are written to.")
    create_topic: bool = Field(
        True, description="Create the topic at start-up if missing (turn off where topics are provisioned apart)."
    )
    produce_timeout_s: float = Field(
        10.0, gt=0, description="How long a call waits for the broker's acks before answering UNAVAILABLE."
    )
    max_batch_events: int = Field(
        1000, ge=1, le=100_000, description="Most events in one SubmitBatch request or one SubmitStream call."
    )

    max_clock_skew_s: float = Field(
        300.0, ge=0, description="How far in the future an event's created_at may be (sender clock skew)."
    )
    max_id_chars: int = Field(
        256, ge=1, le=4096,
        description="Longest completion, annotator, tenant, project, criterion or item id accepted.",
    )
    max_comment_chars: int = Field(4096, ge=0, le=1_000_000, description="Longest free-text comment accepted.")
    max_criteria: int = Field(32, ge=0, le=1000, description="Most rubric criteria named by one event.")
    max_marks: int = Field(128, ge=0, le=10_000, description="Most per-criterion marks in one event.")
    max_ranked: int = Field(64, ge=2, le=10_000, description="Most completions in one ranking.")

    dedup_window_size: int = Field(
        100_000, ge=0, description="Accepted event ids remembered to answer DUPLICATE (0 turns the window off)."
    )
    dedup_ttl_s: float = Field(
        24 * 3600.0, gt=0, description="How long an accepted event id stays in the dedup window."
    )
    warm_dedup_records: int = Field(
        10_000, ge=0,
        description="At start-up, read up to this many of the newest records per partition into the dedup window.",
    )

    store_root: str = Field(
        ".tuneloop/store",
        validation_alias="TUNELOOP_STORE_ROOT",
        description="Preference store root (folder or URL) GetAgreement reads (env TUNELOOP_STORE_ROOT, shared "
        "with the store).",
    )

    @field_validator("store_root", mode="before")
    @classmethod
    def _root_as_text(cls, value: object) -> object:
        return os.fspath(value) if isinstance(value, os.PathLike) else value
