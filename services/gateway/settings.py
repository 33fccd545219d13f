"""Gateway settings (env prefix TUNELOOP_GATEWAY_)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from tuneloop.common.settings import ListenPort, MetricsPort, ServiceSettings


class GatewaySettings(ServiceSettings):
    """The HTTP gateway (serving fields: ServiceSettings; /metrics on a port apart from the
    public API)."""

    model_config = SettingsConfigDict(env_prefix="TUNELOOP_GATEWAY_")

    port: ListenPort = 8080
    metrics_port: MetricsPort = 9095
    generation_target: str = Field("127.0.0.1:50051", description="host:port of the Generation service.")
    candidate_generation_target: str | None = Field(
        None,
        description="host:port of a Generation service serving the candidate version; requests for model "
        "'candidate' go there (A/B comparisons against production).",
    )
    feedback_target: str = Field("127.0.0.1:50053", description="host:port of the Feedback service.")
    api_keys_file: Path | None = Field(
        None, description="YAML or JSON file of API keys (sha256 hashes, tenant, roles), e.g. from a Secret."
    )
    api_docs: bool = Field(
        False, description="Serve the OpenAPI document and its pages (/openapi.json, /docs, /redoc) on the API port."
    )
    limits_storage_url: str | None = Field(
        None,
        description="Redis URL (redis://host:6379/0) where every gateway replica counts the limits below "
        "together. Unset: counted in this process, right only for a single replica.",
    )
    rate_limit_per_minute: int = Field(600, ge=1, description="Requests per minute per API key (sliding window).")
    tenant_tokens_per_minute: int = Field(
        200_000,
        ge=1,
        description="Tokens per minute per tenant, charged when a generation starts at what it may use: "
        "prompt (estimated at 3 UTF-8 bytes per token) plus max_tokens for each of n candidates.",
    )
    tenant_max_concurrent: int = Field(
        16, ge=1, description="Generations one tenant may have running at once (streams until they end)."
    )
    default_max_tokens: int = Field(
        512, ge=1, le=4096, description="max_tokens of a chat completion that names none (what is charged)."
    )
    max_body_bytes: int = Field(1_048_576, ge=1024, description="Largest request body accepted (413 above).")
    max_feedback_batch: int = Field(500, ge=1, description="Most feedback events in one request.")
    request_timeout_s: float = Field(120, gt=0, description="Deadline of each call to a backend service.")
    tenancy_cache_size: int = Field(
        200_000, ge=0, description="Completion ids remembered with their tenant, for 403 on foreign feedback."
    )
    workbench_projects_dir: Path | None = Field(
        None, description="Folder of annotation project files (YAML) served by /workbench."
    )
    workbench_state_dir: Path | None = Field(
        None,
        description="Writable folder for the workbench's queue progress (JSON lines per project), shared by the "
        "gateway replicas; default: <workbench_projects_dir>/.state.",
    )
    workbench_runs_dir: Path | None = Field(
        None,
        description="Folder of retrain run directories, for the workbench's runs pages; a run is shown to the "
        "tenants its preferences.tenants names.",
    )
    workbench_registry_root: Path | None = Field(
        None,
        description="Model registry folder for the workbench's versions page and its promote and roll-back "
        "actions (needs write access for those); unset: no versions page.",
    )
    workbench_models: dict[str, list[str]] = Field(
        default_factory=dict,
        description="Registry model names each tenant's leads and operators see and act on, as JSON "
        '{"tenant": ["policy"]}; a model no tenant names is shown to none.',
    )
    workbench_generation_metrics: str | None = Field(
        None,
        description="host:port of the Generation replicas' Prometheus endpoint, for the served version per "
        "replica on the runs page; a name resolving to several addresses (a headless Service) is scraped at "
        "each one. Unset: not shown.",
    )
    model_events_bootstrap_servers: str | None = Field(
        None,
        description="Kafka brokers to publish the workbench's promotions and rollbacks to as ModelEvents on "
        "tuneloop.models.v1 (the TUNELOOP_KAFKA_* security settings apply); unset: serving services see "
        "the change at their next registry poll.",
    )
