"""Settings of the Generation service (env prefix TUNELOOP_GENERATION_)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from tuneloop.common.settings import HandlerThreads, ListenPort, MetricsPort, ModelServingSettings, OpenCalls

# The LoRA ranks vLLM can be sized for (vllm.config.lora.MaxLoRARanks).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


class GenerationSettings(ModelServingSettings):
    """How the policy is served, batched, logged to Kafka and swapped on promotion."""

    model_config = SettingsConfigDict(env_prefix="TUNELOOP_GENERATION_")

    # ---- serving: this service's defaults (the fields are ModelServingSettings') ---------
    port: ListenPort = 50051
    metrics_port: MetricsPort = 9091
    max_workers: HandlerThreads = 64
    max_open_calls: OpenCalls = 128

    # ---- model and engine --------------------------------------------------------------
    model: str = Field(
        "policy@production",
        description=(
            "What to serve: a registry ref (NAME@ALIAS follows the alias, NAME@vNNNN is pinned) or a model folder."
        ),
    )
    engine: Literal["transformers", "vllm"] = Field(
        "transformers", description="Inference engine: transformers (CPU, dynamic batching) or vllm (AsyncLLM)."
    )
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="Weights and activations dtype; bfloat16 drifts from float32 on CPUs."
    )
    max_model_len: int | None = Field(
        None, ge=16, description="Longest prompt plus answer in tokens; default: the model's position limit."
    )

    # ---- sampling defaults and bounds --------------------------------------------------
    default_max_tokens: int = Field(256, ge=1, description="max_tokens when a request leaves it unset.")
    max_tokens_cap: int = Field(1024, ge=1, description="Requests asking for more new tokens get this many at most.")

    # ---- transformers engine -----------------------------------------------------------
    batch_window_ms: float = Field(
        5.0, ge=0, le=1000, description="How long the first waiting request waits for others to share its batch."
    )
    max_batch_size: int = Field(16, ge=1, le=256, description="Most sequences (candidates) generated together.")
    torch_threads: int | None = Field(None, ge=1, description="torch intra-op threads; default: torch's choice.")

    # ---- vLLM engine -------------------------------------------------------------------
    vllm_kv_cache_bytes: int = Field(
        1 << 30, ge=1 << 20, description="KV cache size in bytes (vLLM kv_cache_memory_bytes)."
    )
    vllm_max_num_seqs: int = Field(64, ge=1, description="Most sequences vLLM schedules in one step.")
    vllm_cache_dir: Path = Field(
        Path(".tuneloop/cache/vllm"), description="VLLM_CACHE_ROOT and TMPDIR of the engine (kept in the project)."
    )
    vllm_enforce_eager: bool = Field(
        True, description="Skip torch.compile (starts in ~20 s instead of ~90 s on a CPU)."
    )
    vllm_max_lora_rank: int = Field(
        0,
        description=(
            "Start vLLM with LoRA support for adapters up to this rank, so that LoRA adapter versions can be "
            "swapped in (one of 0, " + ", ".join(map(str, VLLM_LORA_RANKS)) + "). 0: LoRA only when the first "
            "version served is an adapter (sized to it). On a CPU, LoRA support turns torch.compile off."
        ),
    )

    # ---- completion log ----------------------------------------------------------------
    spool_path: Path | None = Field(
        None,
        description=(
            "Local append-only file holding completion records Kafka has not acknowledged yet; one writer only. "
            "Default: .tuneloop/generation/completions-<port>.spool, so a restart on the same port flushes it."
        ),
    )
    spool_max_bytes: int = Field(
        256 << 20,
        ge=4096,
        description="When the spool reaches this size new requests are refused (UNAVAILABLE) until Kafka is back.",
    )
    spool_fsync: bool = Field(True, description="fsync the spool after each append (survives a host crash).")
    publish_timeout_s: float = Field(
        5.0, gt=0, description="How long a record may wait for Kafka's acknowledgement before it is spooled."
    )
    publish_retry_s: float = Field(2.0, gt=0, description="Pause between attempts to reach Kafka while it is down.")

    def spool_file(self) -> Path:
        if self.spool_path is not None:
            return self.spool_path
        # Port 0 (a free port picked at start) cannot be found again: one spool per process.
        suffix = str(self.port) if self.port else f"pid{os.getpid()}"
        return Path(".tuneloop/generation") / f"completions-{suffix}.spool"

    @field_validator("vllm_max_lora_rank")
    @classmethod
    def _lora_rank_vllm_takes(cls, value: int) -> int:
        if value != 0 and value not in VLLM_LORA_RANKS:
            raise ValueError(f"must be 0 or one of {', '.join(map(str, VLLM_LORA_RANKS))}, not {value}")
        return value

    @model_validator(mode="after")
    def _defaults_within_cap(self) -> GenerationSettings:
        if self.default_max_tokens > self.max_tokens_cap:
            raise ValueError(
                f"default_max_tokens ({self.default_max_tokens}) exceeds max_tokens_cap ({self.max_tokens_cap})"
            )
        return self
