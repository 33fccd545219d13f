"""The store's settings (env: TUNELOOP_STORE_*)."""

from __future__ import annotations

import os
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from tuneloop.common.kafka import COMPLETIONS_TOPIC, FEEDBACK_DLQ_TOPIC, FEEDBACK_TOPIC
from tuneloop.common.settings import GrpcServiceSettings, ListenPort, MetricsPort
from tuneloop.store.pairs import PairRules


class StoreSettings(GrpcServiceSettings):
    """The preference store (env: TUNELOOP_STORE_*). Its gRPC server answers health checks
    only (serving fields: GrpcServiceSettings)."""

    model_config = SettingsConfigDict(env_prefix="TUNELOOP_STORE_")

    root: str = Field(
        ".tuneloop/store",
        min_length=1,
        description="Where the tables live: a folder (local or mounted), or an object-storage URL such as "
        "s3://bucket/prefix (credentials and endpoint from AWS_* variables).",
    )
    port: ListenPort = 50054
    # Health checks are the only calls (a probe's Watch stream stays open until the server
    # stops): waiting longer drains nothing and only delays the consumer's exit.
    grace_seconds: float = Field(1.0, ge=0, description="On SIGTERM, how long open health calls may still run.")
    metrics_port: MetricsPort = 9094
    group_id: str = Field(
        "tuneloop-store",
        min_length=1,
        description="Kafka consumer group: the store replicas in it share the topics' partitions.",
    )
    feedback_topic: str = Field(FEEDBACK_TOPIC, min_length=1, description="Topic of FeedbackEvent records.")
    completions_topic: str = Field(COMPLETIONS_TOPIC, min_length=1, description="Topic of CompletionRecord records.")
    dlq_topic: str = Field(FEEDBACK_DLQ_TOPIC, min_length=1, description="Topic dead letters go to.")
    create_topics: bool = Field(True, description="Create missing topics at start (off where topics are managed).")
    join_timeout_s: float = Field(
        600.0,
        gt=0,
        le=7 * 86400,
        description="How long feedback waits for its completion record before it is dead-lettered; "
        "longer than the completions stream can lag behind the feedback stream.",
    )
    pending_max: int = Field(
        10_000,
        ge=1,
        le=1_000_000,
        description="Most feedback events held waiting for their completions; at the bound the store stops "
        "reading feedback (completions keep flowing) until some are joined or dead-lettered.",
    )
    pending_max_per_tenant: int = Field(
        1_000,
        ge=1,
        description="Most of one tenant's feedback events held waiting; beyond it that tenant's oldest waiting "
        "event is dead-lettered (reason pending_limit) once the completions partitions are read to their end, "
        "so one tenant naming completions that never come "
        "cannot fill the waiting room and pause everyone's feedback.",
    )
    pending_max_bytes: int = Field(
        64 * 2**20,
        ge=1,
        description="Most bytes of feedback events (their serialized size) held waiting, 64 MiB by default; "
        "at the bound the store stops reading feedback like at pending_max: a few large events cost "
        "memory that their count does not show.",
    )
    pending_max_bytes_per_tenant: int = Field(
        8 * 2**20,
        ge=1,
        description="Most bytes of one tenant's feedback events held waiting, 8 MiB by default (eight events "
        "of Kafka's default 1 MiB largest message); beyond it that tenant's oldest waiting event is "
        "dead-lettered (reason pending_limit) like at pending_max_per_tenant, so one tenant's large events cannot fill the waiting room.",
    )
    completion_cache_max: int = Field(
        100_000,
        ge=0,
        description="Completions kept in memory for joins; older ones are read back from the table.",
    )
    batch_max_records: int = Field(500, ge=1, le=100_000, description="Most records per commit.")
    batch_linger_s: float = Field(
        1.0, ge=0, le=60, description="How long a batch collects records before it commits (fewer, larger files)."
    )
    ranking_pairs: Literal["all", "adjacent"] = Field(
        "all", description="Ranking → pairs: every ordered pair, or adjacent ranks only (pairs.py)."
    )
    rating_pairs: bool = Field(True, description="Pair scores of the same group that differ by the margin (pairs.py).")
    rating_margin: float = Field(1.0, gt=0, description="Least score gap, in scale units, that makes a rating pair.")
    thumbs_pairs: bool = Field(True, description="Pair a thumbs-up with a thumbs-down of the same group (pairs.py).")
    rating_scope: Literal["request", "prompt"] = Field(
        "prompt", description="Ratings compare within one request's candidates, or across requests of the same prompt."
    )
    rating_same_annotator: bool = Field(True, description="Ratings compare only when given by the same annotator.")
    max_pairs_per_event: int = Field(
        64,
        ge=1,
        description="Most pairs one event may add (each copies the prompt and both answers): a ranking keeps "
        "its pairs of closest ranks first, a rating pairs with its latest comparable ratings.",
    )
    end_user_weight: float = Field(
        1.0, ge=0, description="Weight of rows from end users' feedback (annotators' rows weigh 1)."
    )
    agreement_interval_s: float = Field(
        60.0, gt=0, description="How often the agreement gauges are recomputed from the judgements."
    )

    @field_validator("root", mode="before")
    @classmethod
    def _path_as_text(cls, value: object) -> object:
        return os.fspath(value) if isinstance(value, os.PathLike) else value

    def pair_rules(self) -> PairRules:
        return PairRules(
            ranking=self.ranking_pairs,
            rating_pairs=self.rating_pairs,
            rating_margin=self.rating_margin,
            thumbs_pairs=self.thumbs_pairs,
            rating_scope=self.rating_scope,
            rating_same_annotator=self.rating_same_annotator,
            max_pairs=self.max_pairs_per_event,
        )
