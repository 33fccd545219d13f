from __future__ import annotations

import pytest
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from tuneloop.common.settings import SettingsError, load_settings


class _Example(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TUNELOOP_EXAMPLE_")
    port: int = Field(50051, ge=1, le=65535, description="Port.")
    batch_window_ms: float = Field(5.0, ge=0, description="Batching window.")


def test_invalid_env_setting_names_field_and_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNELOOP_EXAMPLE_PORT", "not-a-port")
    with pytest.raises(SettingsError) as err:
        load_settings(_Example)
    assert "port (TUNELOOP_EXAMPLE_PORT)" in str(err.value)


def test_out_of_bounds_override_is_rejected() -> None:
    with pytest.raises(SettingsError, match=r"batch_window_ms \(TUNELOOP_EXAMPLE_BATCH_WINDOW_MS\)"):
        load_settings(_Example, batch_window_ms=-1)


def test_none_overrides_fall_through_to_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNELOOP_EXAMPLE_PORT", "6000")
    assert load_settings(_Example, port=None).port == 6000
    assert load_settings(_Example, port=7000).port == 7000
