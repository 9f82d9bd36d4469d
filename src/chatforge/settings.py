"""Process settings for the operational side: logs, alerts, metrics, conversation store.

Read once from ``CHATFORGE_*`` environment variables (twelve-factor style) and validated
with pydantic, so a typo such as ``CHATFORGE_ENV=prod`` fails at start-up naming the
variable and the allowed values instead of silently running with a default.

``env == "test"`` switches every *production sink* off: no log file, no alert webhook,
and the conversation store goes to an in-memory SQLite database unless the caller passes
``store_url`` explicitly (keyword or ``CHATFORGE_STORE_URL``). Consumers must read the
``effective_*`` properties (never the raw fields) so that a developer shell that exports a
production log path or webhook cannot leak test traffic into them.
"""

from __future__ import annotations

import functools
import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

ENV_PREFIX = "CHATFORGE_"
# Set (True) on every logging handler chatforge itself installs: the CLI's console handler and
# configure_logging's handlers. configure_logging replaces all of them, so a process that both
# runs the CLI and serves writes each event once, in the chosen format.
LOG_HANDLER_ATTR = "_chatforge_handler"
DEFAULT_STORE_URL = "sqlite:///runs/conversations.db"
# Shared-cache-free in-memory SQLite; the store pins it to one connection (StaticPool).
TEST_STORE_URL = "sqlite://"

Env = Literal["production", "development", "test"]
LogFormat = Literal["json", "human"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
AlertFormat = Literal["jandi", "slack"]


class SettingsError(ValueError):
    """A ``CHATFORGE_*`` variable (or keyword) has a value that is not allowed."""


class Settings(BaseModel):
    """Operational settings; build with :meth:`from_env` or directly with keywords."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    env: Env = "development"
    log_format: LogFormat = "json"
    log_level: LogLevel = "INFO"
    log_file: Path | None = None
    log_file_max_bytes: int = Field(default=10 * 1024 * 1024, gt=0)
    log_file_backups: int = Field(default=5, ge=0)
    log_user_text: bool = False
    log_user_text_chars: int = Field(default=80, ge=0)
    alert_webhook_url: str | None = None
    alert_format: AlertFormat = "jandi"
    # Threshold rules over a rolling window of finished calls (serving/alert_rules.py).
    alert_error_rate: float = Field(default=0.05, ge=0.0, le=1.0)
    alert_p99_ms: float = Field(default=5000.0, gt=0.0)
    alert_window_seconds: float = Field(default=60.0, gt=0.0)
    alert_min_calls: int = Field(default=20, ge=1)
    server_name: str = Field(default_factory=socket.gethostname)
    # None means "not chosen": resolved by :attr:`effective_store_url`.
    store_url: str | None = None
    # How long the store's writer gathers turns into one transaction (serving/store.py STORE_LINGER_S); 0: none.
    store_linger_ms: float = Field(default=50.0, ge=0.0, le=5000.0)
    metrics_port: int = Field(default=9100, ge=0, le=65535)

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, v: Any) -> Any:
        return v.upper() if isinstance(v, str) else v

    @field_validator("env", "log_format", "alert_format", mode="before")
    @classmethod
    def _lower_choice(cls, v: Any) -> Any:
        return v.lower() if isinstance(v, str) else v

    @field_validator("alert_webhook_url")
    @classmethod
    def _http_url(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            # Don't echo the value: webhook URLs are secrets.
            raise ValueError("must start with http:// or https://")
        return v

    # -- derived, sink-aware views -------------------------------------------------------
    @property
    def production_sinks_enabled(self) -> bool:
        """False under ``env == "test"``: nothing may reach files, webhooks or real DBs."""
        return self.env != "test"

    @property
    def effective_log_file(self) -> Path | None:
        return self.log_file if self.production_sinks_enabled else None

    @property
    def effective_alert_webhook_url(self) -> str | None:
        return self.alert_webhook_url if self.production_sinks_enabled else None

    @property
    def effective_store_url(self) -> str:
        if self.store_url:
            return self.store_url
        return DEFAULT_STORE_URL if self.production_sinks_enabled else TEST_STORE_URL

    # -- construction --------------------------------------------------------------------
    @classmethod
    def env_var(cls, field: str) -> str:
        return ENV_PREFIX + field.upper()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Read ``CHATFORGE_<FIELD>`` variables; keyword ``overrides`` win over them.

        Empty variables count as unset. Unrelated ``CHATFORGE_*`` variables (used by
        other parts of chatforge) are ignored.
        """
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        from_env: set[str] = set()
        for name in cls.model_fields:
            raw = environ.get(cls.env_var(name))
            if raw is not None and raw.strip() != "":
                values[name] = raw.strip()
                from_env.add(name)
        for name in overrides:
            from_env.discard(name)
        values.update(overrides)
        try:
            return cls(**values)
        except ValidationError as e:
            raise SettingsError(_describe(e, from_env)) from None


def _describe(e: ValidationError, from_env: set[str]) -> str:
    lines = []
    for err in e.errors():
        field = str(err["loc"][0]) if err["loc"] else "?"
        where = Settings.env_var(field) if field in from_env else field
        shown = "<hidden>" if "url" in field else repr(err.get("input"))
        lines.append(f"{where}={shown} is invalid: {err['msg']}")
    return "invalid chatforge settings: " + "; ".join(lines)


@functools.lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Process-wide settings from the environment (cached; ``get_settings.cache_clear()`` resets)."""
    return Settings.from_env()
