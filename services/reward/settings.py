"""Settings of the Reward service (env: TUNELOOP_REWARD_*).

The registry root comes from `RegistrySettings` (TUNELOOP_REGISTRY_ROOT), shared with every
part that reads models.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import SettingsConfigDict

from tuneloop.common.settings import ListenPort, MetricsPort, ModelServingSettings


class RewardSettings(ModelServingSettings):
    """How the Reward service batches, validates, and which scorer it serves (serving and alias
    fields: ModelServingSettings)."""

    model_config = SettingsConfigDict(env_prefix="TUNELOOP_REWARD_")

    port: ListenPort = 50052
    metrics_port: MetricsPort = 9092

    backend: Literal["model", "judge"] = Field(
        "model", description="'model': a trained reward model from the registry; 'judge': an LLM judge over HTTP."
    )
    model: str = Field(
        "reward@production",
        description="Reward model: NAME@ALIAS (followed as the alias moves), NAME@vNNNN, or a model folder.",
    )
    device: str = Field("cpu", description="torch device the reward model runs on ('cpu', 'cuda', 'cuda:1').")
    torch_threads: int = Field(
        0,
        ge=0,
        le=256,
        description="CPU threads per forward pass (0: torch's default, one per visible core; set it to the "
        "pod's CPU limit, which torch cannot see).",
    )
    max_loaded_models: int = Field(
        2, ge=0, le=16, description="Versions other than the served one kept loaded for calls that pin a version."
    )

    max_request_items: int = Field(256, ge=1, le=100_000, description="Most items in one Score request.")
    max_batch_size: int = Field(32, ge=1, le=4096, description="Most pairs in one forward pass (dynamic batching).")
    batch_window_ms: float = Field(
        5.0, ge=0, le=10_000, description="How long a batch waits for more concurrent calls before it runs."
    )
    max_tokens: int = Field(1024, ge=8, description="Longest encoded (prompt, response) pair the model accepts.")
    max_prompt_chars: int = Field(32_768, ge=1, description="Longest prompt accepted, in characters (all turns).")
    max_response_chars: int = Field(32_768, ge=0, description="Longest response accepted, in characters.")

    judge_base_url: str | None = Field(
        None, description="OpenAI-compatible API base of the judge, e.g. http://gateway:8080/v1 (backend=judge)."
    )
    judge_model: str | None = Field(None, description="Model name sent to the judge endpoint (backend=judge).")
    judge_api_key: SecretStr = Field(SecretStr(""), description="Bearer token for the judge endpoint.")
    judge_rubric_path: Path | None = Field(
        None, description="File with the rubric text the judge scores by (backend=judge)."
    )
    judge_timeout_s: float = Field(60.0, gt=0, description="Deadline of one judge HTTP call.")
    judge_concurrency: int = Field(8, ge=1, le=256, description="Judge HTTP calls in flight at once.")
    judge_max_tokens: int = Field(64, ge=1, le=4096, description="Most tokens the judge may answer with.")

    @model_validator(mode="after")
    def _judge_complete(self) -> RewardSettings:
        if self.backend == "judge":
            missing = [n for n in ("judge_base_url", "judge_model", "judge_rubric_path") if getattr(self, n) is None]
            if missing:
                raise ValueError(f"backend 'judge' needs {', '.join(missing)}")
            if not self.judge_rubric_path.is_file():
                raise ValueError(f"judge_rubric_path {self.judge_rubric_path} is not a file")
        return self
