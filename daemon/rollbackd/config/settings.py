"""The daemon's config file, with environment overrides ``ROLLBACKD_SECTION__KEY``."""

from __future__ import annotations

from datetime import timedelta
from enum import StrEnum
from typing import Any, ClassVar, Self
from urllib.parse import parse_qsl, urlsplit

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from rollbackd.config.strict import Strict, as_init_error
from rollbackd.core.durations import Duration
from rollbackd.core.model import Mode
from rollbackd.notify import Notifier


class LogFormat(StrEnum):
    AUTO = "auto"
    """JSON when not on a terminal (under systemd), readable lines on one."""
    JSON = "json"
    CONSOLE = "console"


class DaemonSection(Strict):
    mode: Mode = Mode.AUTO
    state_dir: str = "/var/lib/rollbackd"
    rule_files: list[str] = Field(default_factory=lambda: ["rules/*.toml"])
    log_format: LogFormat = LogFormat.AUTO
    log_level: str = Field(default="info", pattern=r"^(debug|info|warning|error)$")
    approval_timeout: Duration = Field(
        default=timedelta(minutes=30), description="a rollback waiting for approval expires"
    )
    stop_grace: Duration = Field(
        default=timedelta(seconds=60),
        description="on SIGTERM, how long a running rollback may take to finish before it is "
        "stopped and marked interrupted",
    )


class BasicAuth(Strict):
    username: str
    password_file: str | None = None
    password_env: str | None = None

    key_hints: ClassVar[dict[str, str]] = {
        "password": "the password is a secret: set 'password_file' or 'password_env'"
    }

    @model_validator(mode="after")
    def _one_password(self) -> Self:
        if (self.password_file is None) == (self.password_env is None):
            raise ValueError("set exactly one of 'password_file' or 'password_env'")
        return self


class PrometheusSection(Strict):
    url: str = "http://127.0.0.1:9090"
    timeout: Duration = timedelta(seconds=10)
    headers: dict[str, str] = Field(default_factory=dict)
    bearer_token_file: str | None = None
    bearer_token_env: str | None = None
    basic_auth: BasicAuth | None = None
    tls_ca_file: str | None = None
    insecure_skip_verify: bool = False

    key_hints: ClassVar[dict[str, str]] = {
        "bearer_token": "the token is a secret: set 'bearer_token_file' or 'bearer_token_env'",
    }

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"must be an http:// or https:// URL, got: {value!r}")
        return value.rstrip("/")


class AlertmanagerSection(Strict):
    """Alertmanager's own API, read while baking: a service's versions bake from the absence
    of its mapped alerts only over polls in which Alertmanager answered. Off without ``url``."""

    url: str | None = None
    timeout: Duration = timedelta(seconds=10)
    bearer_token_file: str | None = None
    bearer_token_env: str | None = None

    key_hints: ClassVar[dict[str, str]] = {
        "bearer_token": "the token is a secret: set 'bearer_token_file' or 'bearer_token_env'",
    }

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"must be an http:// or https:// URL, got: {value!r}")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _one_token(self) -> Self:
        if self.bearer_token_file is not None and self.bearer_token_env is not None:
            raise ValueError("set at most one of 'bearer_token_file' or 'bearer_token_env'")
        return self


class ServerSection(Strict):
    listen: str = Field(default="127.0.0.1:9095", pattern=r"^(\[[0-9a-fA-F:]+\]|[^:\s]+):\d{1,5}$")
    token_file: str | None = "/etc/rollbackd/token"  # noqa: S105 (a path, not a secret)
    token_env: str | None = None
    max_body: int = Field(default=1_048_576, ge=1024, description="request body limit, bytes")
    webhook_max_body: int = Field(
        default=16 * 1_048_576,
        ge=1024,
        description="Alertmanager webhook body limit, bytes: a whole alert group is one "
        "delivery (about 300 bytes per alert), and a 413 is never retried",
    )
    public_url: str | None = Field(
        default=None, description="how people reach this daemon, for links in notifications"
    )

    key_hints: ClassVar[dict[str, str]] = {
        "token": "the API token is a secret: set 'token_file' or 'token_env'"
    }


class GuardsSection(Strict):
    cooldown: Duration = timedelta(minutes=15)
    max_rollbacks: int = Field(default=3, ge=1)
    window: Duration = timedelta(hours=1)


class StoreSection(Strict):
    """The state in PostgreSQL (one database, owned by the URL's role). Without ``[store]``
    the state is SQLite under ``[daemon] state_dir``."""

    url: str = Field(
        description="a libpq URI, postgresql://USER@HOST:PORT/DATABASE?sslmode=verify-full; "
        "its password comes from password_file or password_env"
    )
    password_file: str | None = None
    password_env: str | None = None
    lease_time: Duration = Field(
        default=timedelta(seconds=10),
        description="how long a daemon holds a service without renewing; a daemon that stops "
        "renewing (dead, paused, cut off) loses its services to the others after it",
    )
    member: str | None = Field(
        default=None,
        min_length=1,
        description="this daemon's name among the daemons sharing the database (default "
        "<hostname>-<pid>-<4 random hex>); unique per running daemon",
    )

    key_hints: ClassVar[dict[str, str]] = {
        "password": "the password is a secret: set 'password_file' or 'password_env'"
    }

    @field_validator("lease_time")
    @classmethod
    def _lease_time(cls, value: timedelta) -> timedelta:
        # Renewed every third of it and acted on for 80%: below 3 s a database hiccup or
        # a garbage-collection pause would hand services to and fro.
        if value < timedelta(seconds=3):
            raise ValueError("must be at least 3s")
        return value

    @field_validator("url")
    @classmethod
    def _postgres_url(cls, value: str) -> str:
        # The value is never echoed back: it may hold the very password refused here.
        if not value.startswith(("postgresql://", "postgres://")):
            raise ValueError("must be a postgresql:// (or postgres://) URL")
        try:
            parts = urlsplit(value)
        except ValueError as exc:  # an unclosed "[" of an IPv6 address, say
            raise ValueError(f"is not a valid URL: {exc}") from None
        in_query = any(key.lower() == "password" for key, _ in parse_qsl(parts.query))
        if parts.password is not None or in_query:
            raise ValueError(
                "must not hold a password: put it in a file named by 'password_file' "
                "(or an environment variable named by 'password_env')"
            )
        return value

    @model_validator(mode="after")
    def _one_password(self) -> Self:
        if self.password_file is not None and self.password_env is not None:
            raise ValueError("set at most one of 'password_file' or 'password_env'")
        return self


class Config(BaseSettings, Strict):
    """The whole config file. Values from the environment override the file."""

    model_config = SettingsConfigDict(
        env_prefix="ROLLBACKD_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        case_sensitive=False,
    )

    daemon: DaemonSection = DaemonSection()
    prometheus: PrometheusSection = PrometheusSection()
    alertmanager: AlertmanagerSection = AlertmanagerSection()
    server: ServerSection = ServerSection()
    guards: GuardsSection = GuardsSection()
    store: StoreSection | None = None
    """None: SQLite under ``[daemon] state_dir``."""
    notify: list[Notifier] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_notifier_names(self) -> Self:
        names = [n.name for n in self.notify]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"notifier names must be unique: {', '.join(duplicates)}")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The environment wins over the file (passed in as init values).
        return (env_settings, init_settings)

    @classmethod
    def from_toml_data(cls, data: dict[str, Any]) -> Config:
        # BaseSettings takes keyword arguments such as `_env_file` and `_env_prefix` as its
        # own options: from the file they would read other files or raise TypeError. No
        # field starts with "_", so such a key is unknown, reported with the rest.
        options = [key for key in data if key.startswith("_")]
        if not options:
            return cls(**data)
        errors = [
            InitErrorDetails(
                type=PydanticCustomError("unknown_key", "unknown key"), loc=(key,), input=data[key]
            )
            for key in options
        ]
        try:
            cls(**{key: value for key, value in data.items() if key not in options})
        except ValidationError as exc:
            errors.extend(as_init_error(error) for error in exc.errors())
        raise ValidationError.from_exception_data(cls.__name__, errors)
