"""The collector's settings: command-line flags override ``NUMWATCH_*`` environment variables."""

from __future__ import annotations

from pathlib import Path

import platformdirs
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def default_database_url() -> str:
    """The embedded SQLite file under the user's data directory."""
    return f"sqlite:///{Path(platformdirs.user_data_dir('numwatch')) / 'numwatch.db'}"


class Settings(BaseSettings):
    """Everything the app factory needs; every field reads ``NUMWATCH_<FIELD>`` from the environment."""

    model_config = SettingsConfigDict(env_prefix="NUMWATCH_", extra="ignore")

    database_url: str = Field(default_factory=default_database_url)
    host: str = "127.0.0.1"
    port: int = 8428
    # Auth: "token" (bearer tokens from `numwatch token create`) or "off" (loopback only).
    auth: str = "token"
    open_reads: bool = False
    insecure_no_auth: bool = False
    max_body_bytes: int = 64 * 1024 * 1024
    # Per token: requests per minute (0 = unlimited); the body limit above applies to all.
    rate_limit_per_minute: int = 1200
    stale_after_seconds: float = 300.0
    finished_grace_seconds: float = 300.0
    metrics_top_k: int = 10
    metrics_cache_seconds: float = 1.0
    # Detectors (see numwatch.monitor.detectors.DetectorConfig).
    detect_explosion_factor: float = 10.0
    detect_window: int = 50
    detect_min_history: int = 10
    detect_vanishing_floor: float = 1e-12
    detect_underflow_threshold: float = 0.01
    detect_collapse_floor: float = 1.0
    detect_collapse_backoffs: int = 5
    detect_spike_sigmas: float = 6.0
    detect_spike_window: int = 128
    detect_spike_score_steps: int = 10_000
    detect_attention_logit_threshold: float = 100.0
    detect_log_z_low: float = -32.0
    detect_log_z_high: float = 32.0
    # Grafana annotations for events (off when no URL).
    grafana_url: str | None = None
    grafana_token: str | None = None
    # Test hook for the fault tests: delay every batch response by this many seconds.
    debug_response_delay_seconds: float = 0.0

    @property
    def auth_enabled(self) -> bool:
        return self.auth != "off"

    @property
    def loopback(self) -> bool:
        return self.host in LOOPBACK_HOSTS
