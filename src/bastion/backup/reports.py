"""What verify, restore and prune report back (JSON-ready, never a secret)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["ProgressCallback", "PruneReport", "RestoreReport", "VerifyReport"]

ProgressCallback = Callable[[str, int, int], None]
"""``progress(stage, done, total)``: a stage (``"dump"``, ``"compress"``, ``"upload"``,
``"download"``, ``"decrypt"``, ``"check"``, ``"safety-backup"``, ``"restore"``) and how far
it got, in that stage's units (bytes, pages or restore items)."""


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """A backup passed every check: checksum, signature, decryption, a scratch restore,
    integrity, and row counts and content hashes equal to its manifest."""

    backup_id: str
    checks: list[str]
    tables: dict[str, int]
    duration_s: float

    def to_dict(self) -> dict[str, Any]:
        return {"ok": True, **asdict(self)}


@dataclass(frozen=True, slots=True)
class RestoreReport:
    """What a restore did — or, for a dry run, would do."""

    backup_id: str
    dry_run: bool
    target: str
    backend: str
    tables: dict[str, int]
    alembic_revisions: list[str]
    safety_backup_id: str | None = None
    duration_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class PruneReport:
    """Backups kept and deleted (or, for a dry run, that would be deleted), newest first."""

    dry_run: bool
    policy: str
    kept: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
