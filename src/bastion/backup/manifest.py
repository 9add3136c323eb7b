"""The manifest of a backup: what it holds, how it is stored, and an HMAC over all of it.

A manifest is JSON beside its archive. It names the archive's SHA-256 and size, so one HMAC
(SHA-256, under the signing key) authenticates both: an edited manifest fails the HMAC, an
edited archive fails the checksum the manifest vouches for. Ids are made by the server,
``20261123T031500Z-1a2b3c4d``, and checked against :data:`BACKUP_ID_PATTERN` wherever one
comes in, so an id can never be a path.

>>> manifest = sign(unsigned_manifest, key)            # doctest: +SKIP
>>> parse_manifest(manifest.to_json(), key) == manifest
True
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
from datetime import datetime
from typing import Any, Final, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from bastion.backup.errors import BackupIntegrityError, BackupNotFoundError

__all__ = [
    "BACKUP_ID_PATTERN",
    "MAX_MANIFEST_BYTES",
    "BackupLabel",
    "BackupManifest",
    "TableSummary",
    "check_backup_id",
    "new_backup_id",
    "parse_manifest",
    "sign",
]

BACKUP_ID_PATTERN: Final = r"^\d{8}T\d{6}Z-[0-9a-f]{8}$"
MAX_MANIFEST_BYTES: Final = 1024 * 1024
FORMAT_VERSION: Final = 1
_BACKUP_ID = re.compile(BACKUP_ID_PATTERN)

BackupLabel = Literal["manual", "scheduled", "pre-restore"]
"""Why a backup was made: by hand, by the scheduler, or as the safety copy before a restore."""


def new_backup_id(now: datetime) -> str:
    """A fresh id: the UTC time to the second, then 8 random hex digits."""
    return f"{now:%Y%m%dT%H%M%SZ}-{secrets.token_hex(4)}"


def check_backup_id(backup_id: str) -> str:
    """Return ``backup_id`` if it is a well-formed id.

    Raises:
        BackupNotFoundError: it is not (no such backup can exist); the message does not echo it.
    """
    if not isinstance(backup_id, str) or not _BACKUP_ID.fullmatch(backup_id):
        raise BackupNotFoundError("no backup has that id (ids look like 20261123T031500Z-1a2b3c4d)")
    return backup_id


class TableSummary(BaseModel):
    """Rows and content hash of one table at the moment of the backup."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    rows: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class BackupManifest(BaseModel):
    """Everything known about one backup, authenticated by ``hmac``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: Literal[1] = FORMAT_VERSION
    id: str = Field(pattern=BACKUP_ID_PATTERN)
    label: BackupLabel = "manual"
    created_at: AwareDatetime
    backend: Literal["sqlite", "postgresql"]
    server_version: str = Field(max_length=200)
    alembic_revisions: tuple[str, ...] = ()
    tables: dict[str, TableSummary]
    dump_bytes: int = Field(ge=0, description="Size of the dump before compression.")
    archive_bytes: int = Field(ge=0)
    archive_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    compression: Literal["zstd"] = "zstd"
    encryption: Literal["none", "age-x25519"] = "none"
    recipient: str | None = Field(default=None, description="age public key, when encrypted.")
    duration_s: float = Field(ge=0)
    hmac: str = Field(default="", pattern=r"^([0-9a-f]{64})?$")

    @property
    def archive_name(self) -> str:
        """The archive's name in the store."""
        return archive_name(self.id)

    @property
    def total_rows(self) -> int:
        return sum(table.rows for table in self.tables.values())

    def to_json(self) -> bytes:
        """The manifest as stored: indented JSON."""
        return self.model_dump_json(indent=2).encode()

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (for ``--json`` and the admin API)."""
        return self.model_dump(mode="json")


def archive_name(backup_id: str) -> str:
    return f"{backup_id}.archive"


def manifest_name(backup_id: str) -> str:
    return f"{backup_id}.manifest.json"


def _digest(manifest: BackupManifest, key: bytes) -> str:
    body = manifest.model_dump(mode="json", exclude={"hmac"})
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hmac.new(key, canonical.encode(), hashlib.sha256).hexdigest()


def sign(manifest: BackupManifest, key: bytes) -> BackupManifest:
    """``manifest`` with its ``hmac`` set under ``key``."""
    return manifest.model_copy(update={"hmac": _digest(manifest, key)})


def parse_manifest(data: bytes, key: bytes, *, expected_id: str | None = None) -> BackupManifest:
    """Parse and authenticate a stored manifest.

    Raises:
        BackupIntegrityError: ``reason="signature"`` when it is not JSON of the expected shape,
            its HMAC does not match (edited, or signed by another key), or it claims another
            id than the name it was stored under.
    """
    if len(data) > MAX_MANIFEST_BYTES:
        raise BackupIntegrityError("the manifest is too large", reason="signature")
    try:
        manifest = BackupManifest.model_validate_json(data)
    except ValidationError:
        raise BackupIntegrityError("the manifest is malformed", reason="signature") from None
    if not hmac.compare_digest(manifest.hmac, _digest(manifest, key)):
        raise BackupIntegrityError(
            f"backup {manifest.id}: the manifest's signature does not match (edited, or made "
            "with another BACKUP_SIGNING_KEY)",
            reason="signature",
        )
    if expected_id is not None and manifest.id != expected_id:
        raise BackupIntegrityError(
            f"backup {expected_id}: the manifest belongs to another backup", reason="signature"
        )
    return manifest
