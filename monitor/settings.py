"""The collector's settings: command-line flags override ``NUMWATCH_*`` environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import platformdirs
from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from numwatch.monitor.detectors.rules import DetectorConfig

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def default_database_url() -> str:
    """The embedded SQLite file under the user's data directory."""
    return f"sqlite:///{Path(platformdirs.user_data_dir('numwatch')) / 'numwatch.db'}"


class Settings(BaseSettings):
    """Everything the app factory needs; every field reads ``NUMWATCH_<FIELD>`` from the environment."""

    # The nested delimiter "_" split at most once maps NUMWATCH_DETECT_<FIELD> onto ``detect.<field>``.
    model_config = SettingsConfigDict(
        env_prefix="NUMWATCH_", extra="ignore", env_nested_delimiter="_", env_nested_max_split=1
    )

    database_url: str = Field(default_factory=default_database_url)
    host: str = "127.0.0.1"
    port: int = 8428
    # Auth: "token" (bearer tokens from `numwatch token create`) or "off" (loopback only, unless insecure_no_auth).
    auth: Literal["token", "off"] = "token"
    open_reads: bool = False
    insecure_no_auth: bool = False
    max_body_bytes: int = 64 * 1024 * 1024
    # Per token: requests per minute (0 = unlimited); the body limit above applies to all.
    rate_limit_per_minute: int = 1200
    stale_after_seconds: float = 300.0
    finished_grace_seconds: float = 300.0
    metrics_top_k: int = 10
    metrics_cache_seconds: float = 1.0
    # Detector thresholds, one env var each: NUMWATCH_DETECT_WINDOW, NUMWATCH_DETECT_VANISHING_FLOOR, ...
    detect: DetectorConfig = DetectorConfig()
    # Retention: runs not heard from for this many days are deleted by the collector (0 = keep every run);
    # it looks every retention_check_seconds, and at once for runs deleted through the API.
    retention_days: float = Field(default=0.0, ge=0)
    retention_check_seconds: float = Field(default=3600.0, gt=0)
    # Grafana annotations for events (off when no URL).
    grafana_url: str | None = None
    grafana_token: str | None = None

    @property
    def auth_enabled(self) -> bool:
        return self.auth != "off"

    @property
    def loopback(self) -> bool:
        return self.host in LOOPBACK_HOSTS

    @model_validator(mode="after")
    def _auth_off_only_on_loopback(self) -> Settings:
        """Auth off on an address others can reach lets anyone write and read runs: only when asked twice."""
        if not self.auth_enabled and not self.loopback and not self.insecure_no_auth:
            raise ValueError(
                f"refusing to serve {self.host} without auth: anyone who reaches it could write and read runs. "
                "Create a token (`numwatch token create --project P`) and drop --auth off, "
                "or pass --insecure-no-auth (NUMWATCH_INSECURE_NO_AUTH=1)"
            )
        return self
