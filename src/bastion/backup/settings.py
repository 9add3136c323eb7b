"""Backup settings, read from the environment once, at the edge (like ``DatabaseSettings``).

Encryption uses age (https://age-encryption.org) through pyrage, streaming, with an **X25519
identity** — the ``AGE-SECRET-KEY-1…`` line that ``age-keygen`` prints. Passphrases are not
accepted: pyrage encrypts passphrase (scrypt) recipients only in memory, and a backup must
stream with bounded memory. When ``BACKUP_ENCRYPTION_KEY`` is set every backup is encrypted;
``BACKUP_ENCRYPT=true`` makes the key mandatory, so a missing key stops the service at start
instead of writing plaintext.

>>> settings = BackupSettings(BACKUP_DIR="/var/backups/app", BACKUP_RETENTION="last=3")
>>> settings.retention_policy.last
3
"""

from __future__ import annotations

import re
from functools import cached_property
from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from bastion.backup.retention import RetentionPolicy
from bastion.errors import ConfigurationError
from bastion.settings import describe_validation_error

__all__ = ["BackupSettings", "load_backup_settings"]

_S3_URL = re.compile(
    r"^s3://(?P<bucket>[a-z0-9][a-z0-9.-]{1,61}[a-z0-9])(?:/(?P<prefix>[\w./-]*))?$"
)
_AGE_IDENTITY = re.compile(r"^AGE-SECRET-KEY-1[0-9A-Z]{58}$")


class BackupSettings(BaseSettings):
    """Where backups go, how they are protected, how long they are kept, how often made."""

    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        populate_by_name=True,
        frozen=True,
    )

    backup_dir: Path = Field(
        default=Path("./data/backups"),
        alias="BACKUP_DIR",
        description="Local directory of backups (and scratch space for every store).",
    )
    store_url: str | None = Field(
        default=None,
        alias="BACKUP_STORE_URL",
        description="s3://bucket/prefix to keep backups in object storage instead of BACKUP_DIR.",
    )
    s3_endpoint: str | None = Field(
        default=None,
        alias="BACKUP_S3_ENDPOINT",
        pattern=r"^https?://[^\s/]+(?::\d+)?/?$",
        description="S3-compatible endpoint (MinIO, moto…); unset: AWS.",
    )
    s3_region: str = Field(default="us-east-1", alias="BACKUP_S3_REGION")
    aws_access_key_id: SecretStr | None = Field(default=None, alias="AWS_ACCESS_KEY_ID")
    aws_secret_access_key: SecretStr | None = Field(default=None, alias="AWS_SECRET_ACCESS_KEY")
    encryption_key: SecretStr | None = Field(
        default=None,
        alias="BACKUP_ENCRYPTION_KEY",
        description="age X25519 identity (AGE-SECRET-KEY-1…); set, every backup is encrypted.",
    )
    encrypt: bool = Field(
        default=False,
        alias="BACKUP_ENCRYPT",
        description="Require encryption: without BACKUP_ENCRYPTION_KEY the service will not start.",
    )
    signing_key: SecretStr | None = Field(
        default=None,
        alias="BACKUP_SIGNING_KEY",
        description="HMAC key (≥ 32 characters) authenticating manifests; unset: generated once "
        "into backup-signing.key beside BACKUP_DIR. Set it when several hosts share a store.",
    )
    retention: str = Field(
        default="last=7,daily=7,weekly=4,monthly=6",
        alias="BACKUP_RETENTION",
        description="Backups kept by prune: last N plus the newest per day, week and month.",
    )
    interval_s: float = Field(
        default=0,
        ge=0,
        le=31 * 86_400,
        alias="BACKUP_INTERVAL_S",
        description="Seconds between scheduled backups (0: no schedule).",
    )
    jitter_s: float = Field(
        default=0,
        ge=0,
        le=86_400,
        alias="BACKUP_JITTER_S",
        description="Up to this many seconds added at random to each interval.",
    )
    max_age_s: float = Field(
        default=2 * 86_400,
        gt=0,
        alias="BACKUP_MAX_AGE_S",
        description="Health reads degraded when the newest valid backup is older than this.",
    )
    compression_level: int = Field(default=3, ge=1, le=19, alias="BACKUP_COMPRESSION_LEVEL")
    pg_bin_dir: Path | None = Field(
        default=None,
        alias="BACKUP_PG_BIN_DIR",
        description="Directory of pg_dump / pg_restore; unset: found on PATH.",
    )

    @field_validator("store_url")
    @classmethod
    def _store_url_is_s3(cls, value: str | None) -> str | None:
        if value is not None and not _S3_URL.match(value):
            raise ValueError("expected s3://bucket or s3://bucket/prefix")
        return value

    @field_validator("encryption_key")
    @classmethod
    def _key_is_age_identity(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not _AGE_IDENTITY.match(value.get_secret_value().strip()):
            raise ValueError(
                "expected an age X25519 identity AGE-SECRET-KEY-1… (see age-keygen); "
                "passphrases are not supported"
            )
        return value

    @field_validator("signing_key")
    @classmethod
    def _signing_key_is_long(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 32:
            raise ValueError("must be at least 32 characters")
        return value

    @field_validator("retention")
    @classmethod
    def _retention_parses(cls, value: str) -> str:
        RetentionPolicy.parse(value)
        return value

    @field_validator("encrypt")
    @classmethod
    def _encryption_has_a_key(cls, value: bool, info: ValidationInfo) -> bool:
        # A field validator (BACKUP_ENCRYPTION_KEY is validated first), so the error names
        # BACKUP_ENCRYPT alone and never echoes the other settings.
        if value and info.data.get("encryption_key") is None:
            raise ValueError(
                "is true but BACKUP_ENCRYPTION_KEY is not set (or not valid); refusing to "
                "write unencrypted backups"
            )
        return value

    @cached_property
    def retention_policy(self) -> RetentionPolicy:
        """``BACKUP_RETENTION``, parsed."""
        return RetentionPolicy.parse(self.retention)

    @property
    def s3_bucket_and_prefix(self) -> tuple[str, str] | None:
        """``(bucket, prefix)`` of ``BACKUP_STORE_URL``, or ``None`` for the local store."""
        if self.store_url is None:
            return None
        match = _S3_URL.match(self.store_url)
        assert match is not None  # validated
        return match["bucket"], (match["prefix"] or "").strip("/")

    @property
    def signing_key_file(self) -> Path:
        """Where a generated signing key lives: beside ``BACKUP_DIR``, never inside it."""
        return self.backup_dir.resolve().parent / "backup-signing.key"


def load_backup_settings(**overrides: Any) -> BackupSettings:
    """Read :class:`BackupSettings` from the environment, plus keyword ``overrides``.

    Raises:
        ConfigurationError: one line per bad variable; secret values are never echoed.
    """
    try:
        return BackupSettings(**overrides)
    except ValidationError as exc:
        raise ConfigurationError(describe_validation_error(exc, BackupSettings)) from None
