"""Cache settings (``REDIS_URL``, ``CACHE_*``), read from the environment once, at the edge.

Without ``REDIS_URL`` the cache is off: :func:`~bastion.cache.create_cache` returns a
:class:`~bastion.cache.NullCache` and every cached function reads its source.

>>> settings = CacheSettings(REDIS_URL="redis://127.0.0.1:6379/0", CACHE_PREFIX="svc:")
>>> settings.display_url
'redis://127.0.0.1:6379/0'
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from bastion.errors import ConfigurationError
from bastion.settings import describe_validation_error

__all__ = ["CacheSettings", "load_cache_settings"]

_SCHEMES = ("redis", "rediss", "unix")


class CacheSettings(BaseSettings):
    """Everything the Redis cache (and the live-update hub) needs."""

    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        populate_by_name=True,
        frozen=True,
    )

    redis_url: SecretStr | None = Field(
        default=None,
        alias="REDIS_URL",
        description="redis://[:password@]host:port/db (or rediss://, unix://); unset: no cache.",
    )
    prefix: str = Field(
        default="bastion:",
        max_length=64,
        pattern=r"^[\x21-\x7e]*$",
        alias="CACHE_PREFIX",
        description="Namespace put before every key, so services can share one Redis.",
    )
    default_ttl_s: float = Field(
        default=60.0,
        gt=0,
        le=30 * 86_400,
        alias="CACHE_DEFAULT_TTL_S",
        description="Seconds a cached value lives when the decorator gives no ttl.",
    )
    compress_min_bytes: int = Field(
        default=1024,
        ge=0,
        le=64 * 1024 * 1024,
        alias="CACHE_COMPRESS_MIN_BYTES",
        description="Values whose JSON is at least this long are stored zstd-compressed.",
    )
    max_value_bytes: int = Field(
        default=1024 * 1024,
        ge=1,
        le=512 * 1024 * 1024,
        alias="CACHE_MAX_VALUE_BYTES",
        description="Encoded values larger than this are served but not stored.",
    )
    socket_timeout_s: float = Field(
        default=0.25,
        gt=0,
        le=60,
        alias="CACHE_SOCKET_TIMEOUT_S",
        description="Seconds one Redis command may take before the cache is bypassed.",
    )
    max_connections: int = Field(
        default=50,
        ge=1,
        le=10_000,
        alias="CACHE_MAX_CONNECTIONS",
        description="Redis connections the process may open.",
    )
    breaker_threshold: int = Field(
        default=3,
        ge=1,
        le=10_000,
        alias="CACHE_BREAKER_THRESHOLD",
        description="Redis failures in a row after which the cache is bypassed for a while.",
    )
    breaker_reset_s: float = Field(
        default=2.0,
        gt=0,
        le=3600,
        alias="CACHE_BREAKER_RESET_S",
        description="Seconds the cache stays bypassed before one request probes Redis again.",
    )
    lock_timeout_s: float = Field(
        default=5.0,
        gt=0,
        le=600,
        alias="CACHE_LOCK_TIMEOUT_S",
        description="Seconds the process loading a missing key holds its cross-process lock.",
    )
    lock_wait_s: float = Field(
        default=0.5,
        ge=0,
        le=60,
        alias="CACHE_LOCK_WAIT_S",
        description="Seconds other processes wait for that load before loading themselves.",
    )

    live_queue_size: int = Field(
        default=256,
        ge=1,
        le=100_000,
        alias="LIVE_QUEUE_SIZE",
        description="Live-update events a subscriber may fall behind before it is dropped.",
    )

    @field_validator("redis_url")
    @classmethod
    def _url_is_redis(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value():
            return None
        scheme = urlsplit(value.get_secret_value()).scheme
        if scheme not in _SCHEMES:
            raise ValueError("must start with redis://, rediss:// or unix://")
        return value

    @property
    def enabled(self) -> bool:
        """Whether a Redis URL is set."""
        return self.redis_url is not None

    @property
    def display_url(self) -> str | None:
        """Scheme, host, port and database of the URL, safe for logs and health details.

        Never the user, the password or the query string (which may carry ``password=``).
        """
        if self.redis_url is None:
            return None
        parts = urlsplit(self.redis_url.get_secret_value())
        try:
            port = f":{parts.port}" if parts.port else ""
        except ValueError:  # a malformed port: not worth echoing
            port = ""
        host = parts.hostname or ""
        if ":" in host:  # IPv6
            host = f"[{host}]"
        if parts.scheme == "unix":  # the path is the socket; the database is in the query
            return f"unix://{parts.path}"
        database = parts.path if re.fullmatch(r"/\d*", parts.path or "/") else ""
        return urlunsplit((parts.scheme, f"{host}{port}", database, "", ""))


def load_cache_settings(**overrides: Any) -> CacheSettings:
    """Read :class:`CacheSettings` from the environment, plus keyword ``overrides``.

    Raises:
        ConfigurationError: a variable has a bad value (one line per problem; the URL, which
            may hold a password, is never echoed).
    """
    try:
        return CacheSettings(**overrides)
    except ValidationError as exc:
        raise ConfigurationError(describe_validation_error(exc, CacheSettings)) from None
