"""Database settings, read from the environment (and ``.env``) once, at the edge.

Build them where the process starts — the app factory, the lifespan, the CLI root — and pass
them down; nothing in Bastion reads the environment on its own. ``load_settings()`` turns a
pydantic validation failure into a :class:`~bastion.errors.ConfigurationError` whose message
is one line per bad variable, naming it and saying what is expected.

>>> settings = DatabaseSettings(DATABASE_URL="postgres://app@db/app", DB_POOL_SIZE=5)
>>> settings.url.drivername
'postgresql+asyncpg'
"""

from __future__ import annotations

from functools import cached_property
from typing import Any, get_args

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import URL

from bastion.errors import ConfigurationError
from bastion.urls import Backend, backend_of, is_memory_sqlite, normalise_database_url

__all__ = ["DatabaseSettings", "load_settings"]

DEFAULT_DATABASE_URL = "sqlite:///./data/bastion.db"


class DatabaseSettings(BaseSettings):
    """Everything a :class:`~bastion.Database` needs, with the names users expect.

    Each field is read from the environment variable in its alias (``DATABASE_URL``,
    ``DB_POOL_SIZE``, …) or passed by that name or the field name.
    """

    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        populate_by_name=True,
        frozen=True,
    )

    database_url: SecretStr = Field(
        default=SecretStr(DEFAULT_DATABASE_URL),
        alias="DATABASE_URL",
        description="postgresql://… or sqlite:///…; normalised to asyncpg / aiosqlite.",
    )
    pool_size: int = Field(
        default=10, ge=1, le=1000, alias="DB_POOL_SIZE", description="Connections kept open."
    )
    max_overflow: int = Field(
        default=10,
        ge=0,
        le=1000,
        alias="DB_MAX_OVERFLOW",
        description="Extra connections opened under load beyond the pool size.",
    )
    pool_timeout_s: float = Field(
        default=10.0,
        gt=0,
        le=600,
        alias="DB_POOL_TIMEOUT",
        description="Seconds to wait for a free connection before answering 503.",
    )
    pool_recycle_s: int = Field(
        default=1800,
        ge=-1,
        alias="DB_POOL_RECYCLE",
        description="Replace connections older than this many seconds (-1: never).",
    )
    pool_pre_ping: bool = Field(
        default=False,
        alias="DB_POOL_PRE_PING",
        description="Ping each connection at checkout (one extra round trip per unit).",
    )
    connect_timeout_s: float = Field(
        default=5.0,
        gt=0,
        le=300,
        alias="DB_CONNECT_TIMEOUT",
        description="Seconds to wait when opening a new connection.",
    )
    close_timeout_s: float = Field(
        default=10.0,
        gt=0,
        le=600,
        alias="DB_CLOSE_TIMEOUT",
        description="Seconds Database.close() waits for connections before giving up.",
    )
    sqlite_busy_timeout_ms: int = Field(
        default=5000,
        ge=0,
        le=600_000,
        alias="DB_SQLITE_BUSY_TIMEOUT",
        description="Milliseconds an SQLite writer waits for the write lock.",
    )
    pgbouncer: bool = Field(
        default=False,
        alias="DB_PGBOUNCER",
        description="PostgreSQL is reached through PgBouncer in transaction mode.",
    )
    workers: int = Field(
        default=1,
        ge=1,
        le=1024,
        alias="WEB_CONCURRENCY",
        description="Server processes sharing the database, for the max_connections check.",
    )
    echo: bool = Field(default=False, alias="DB_ECHO", description="Log every statement.")
    application_name: str = Field(
        default="bastion",
        min_length=1,
        max_length=63,
        pattern=r"^[\x20-\x7e]+$",
        alias="DB_APPLICATION_NAME",
        description="PostgreSQL application_name of every connection (pg_stat_activity).",
    )
    statement_timeout_s: float = Field(
        default=30.0,
        ge=0,
        le=86_400,
        alias="DB_STATEMENT_TIMEOUT",
        description="Seconds one statement may run before it is cancelled (0: no limit).",
    )
    retry_attempts: int = Field(
        default=3,
        ge=1,
        le=100,
        alias="MAX_RETRY_ATTEMPTS",
        description="Attempts at a retried unit of work, the first one included (1: no retry).",
    )
    retry_max_delay_s: float = Field(
        default=10.0,
        gt=0,
        le=600,
        alias="RETRY_MAX_DELAY",
        description="Seconds after which a retried unit stops retrying, whatever the attempts.",
    )
    retry_initial_backoff_s: float = Field(
        default=0.05,
        gt=0,
        le=60,
        alias="RETRY_INITIAL_BACKOFF",
        description="Upper bound of the first jittered sleep between attempts; doubles after.",
    )
    retry_max_backoff_s: float = Field(
        default=2.0,
        gt=0,
        le=600,
        alias="RETRY_MAX_BACKOFF",
        description="Largest sleep between two attempts.",
    )
    breaker_failure_threshold: int = Field(
        default=5,
        ge=1,
        le=10_000,
        alias="BREAKER_FAILURE_THRESHOLD",
        description="Consecutive connection failures that open the circuit breaker.",
    )
    breaker_reset_timeout_s: float = Field(
        default=2.0,
        gt=0,
        le=3600,
        alias="BREAKER_RESET_TIMEOUT",
        description="Seconds the breaker stays open before it lets one probe through.",
    )

    slow_query_threshold_s: float = Field(
        default=0.5,
        gt=0,
        le=3600,
        alias="SLOW_QUERY_THRESHOLD",
        description="Seconds after which a statement is logged as slow, with its route.",
    )
    leak_threshold_s: float = Field(
        default=30.0,
        gt=0,
        le=86_400,
        alias="LEAK_DETECTION_THRESHOLD",
        description="Seconds a connection may stay checked out before it is reported.",
    )
    n_plus_one_threshold: int = Field(
        default=10,
        ge=2,
        le=10_000,
        alias="N_PLUS_ONE_THRESHOLD",
        description="Runs of one statement within one request that are reported as N+1.",
    )
    health_latency_degraded_s: float = Field(
        default=1.0,
        gt=0,
        le=600,
        alias="HEALTH_LATENCY_DEGRADED",
        description="SELECT 1 slower than this many seconds reads as degraded.",
    )
    health_pool_degraded: float = Field(
        default=0.9,
        gt=0,
        le=1,
        alias="HEALTH_POOL_DEGRADED",
        description="Share of the pools checked out above which the pool reads as degraded.",
    )
    health_cache_s: float = Field(
        default=1.0,
        ge=0,
        le=60,
        alias="HEALTH_CACHE_TTL",
        description="Seconds a health result is reused, so probes cannot storm the database.",
    )
    admin_token: SecretStr | None = Field(
        default=None,
        alias="ADMIN_TOKEN",
        description="Bearer token of the /admin/database API; unset, the admin API is off.",
    )

    @field_validator("admin_token")
    @classmethod
    def _admin_token_is_strong(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 16:
            raise ValueError("must be at least 16 characters (or unset to turn the admin API off)")
        return value

    @field_validator("database_url")
    @classmethod
    def _url_is_supported(cls, value: SecretStr) -> SecretStr:
        normalise_database_url(value.get_secret_value())
        return value

    @cached_property
    def url(self) -> URL:
        """The normalised async-driver URL (its ``repr`` hides the password)."""
        return normalise_database_url(self.database_url.get_secret_value())

    @property
    def backend(self) -> Backend:
        """``"postgresql"`` or ``"sqlite"``."""
        return backend_of(self.url)

    @property
    def is_memory(self) -> bool:
        """Whether this is an in-memory SQLite database, gone when its connection closes."""
        return is_memory_sqlite(self.url)

    @property
    def display_url(self) -> str:
        """The URL with its password masked, safe for logs and messages."""
        return self.url.render_as_string(hide_password=True)


def load_settings(**overrides: Any) -> DatabaseSettings:
    """Read :class:`DatabaseSettings` from the environment, plus keyword ``overrides``.

    Raises:
        ConfigurationError: a variable has a bad value. The message has one line per problem,
            ``DB_POOL_SIZE: expected an integer ≥ 1 (got '0')``; secret values are never
            echoed.
    """
    try:
        return DatabaseSettings(**overrides)
    except ValidationError as exc:
        raise ConfigurationError(describe_validation_error(exc, DatabaseSettings)) from None


def describe_validation_error(exc: ValidationError, model: type[BaseSettings]) -> str:
    """One line per error: the environment variable, what is wrong, and the offending value.

    Values of secret fields (and of anything that looks like a URL with a password) are not
    shown.
    """
    aliases = {name: (field.alias or name) for name, field in model.model_fields.items()}
    secret = {
        alias for name, alias in aliases.items() if _is_secret(model.model_fields[name].annotation)
    }
    lines = []
    for error in exc.errors(include_url=False):
        location = str(error["loc"][0]) if error["loc"] else "settings"
        variable = aliases.get(location, location)
        message = error["msg"].removeprefix("Value error, ")
        if variable in secret:
            lines.append(f"{variable}: {message}")
        else:
            lines.append(f"{variable}: {message} (got {error.get('input')!r})")
    return "; ".join(lines)


def _is_secret(annotation: Any) -> bool:
    """``SecretStr``, also inside ``SecretStr | None``."""
    return annotation is SecretStr or SecretStr in get_args(annotation)
