"""Verified, encrypted backups and safe restores of a :class:`~bastion.Database`.

* :class:`BackupService` — create, list, verify, restore, prune; a ``backup`` health check.
* :class:`BackupScheduler` — a backup every ``BACKUP_INTERVAL_S`` (plus jitter), made by
  exactly one of the service's workers.
* :class:`BackupSettings` — ``BACKUP_DIR``, ``BACKUP_STORE_URL``, ``BACKUP_ENCRYPTION_KEY``,
  ``BACKUP_RETENTION``…, read once at the edge with :func:`load_backup_settings`.

Pipeline: a consistent dump (SQLite online backup API, ``pg_dump -Fc`` at an exported
snapshot) → zstd → age (X25519) → SHA-256 → store (a directory or S3), then a manifest with
per-table row counts and content hashes, authenticated by an HMAC.

>>> async with Database(load_settings()) as db:                 # doctest: +SKIP
...     service = BackupService(db, load_backup_settings())
...     manifest = await service.create()
...     await service.verify(manifest.id)
"""

from bastion.backup.errors import (
    BackupIntegrityError,
    BackupNotFoundError,
    BackupStoreError,
    BackupToolError,
    ConfirmationRequiredError,
    RestoreInProgressError,
)
from bastion.backup.manifest import BACKUP_ID_PATTERN, BackupManifest, TableSummary
from bastion.backup.reports import ProgressCallback, PruneReport, RestoreReport, VerifyReport
from bastion.backup.retention import RetentionPolicy, select_backups_to_delete
from bastion.backup.scheduler import BackupScheduler
from bastion.backup.service import BackupService
from bastion.backup.settings import BackupSettings, load_backup_settings
from bastion.backup.stores import BackupStore, LocalStore, S3Store, create_store

__all__ = [
    "BACKUP_ID_PATTERN",
    "BackupIntegrityError",
    "BackupManifest",
    "BackupNotFoundError",
    "BackupScheduler",
    "BackupService",
    "BackupSettings",
    "BackupStore",
    "BackupStoreError",
    "BackupToolError",
    "ConfirmationRequiredError",
    "LocalStore",
    "ProgressCallback",
    "PruneReport",
    "RestoreInProgressError",
    "RestoreReport",
    "RetentionPolicy",
    "S3Store",
    "TableSummary",
    "VerifyReport",
    "create_store",
    "load_backup_settings",
    "select_backups_to_delete",
]
