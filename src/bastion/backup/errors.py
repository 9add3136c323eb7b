"""Errors of backups and restores, in Bastion's one error tree.

::

    BastionError
    ├── BackupToolError             pg_dump / pg_restore missing, older than the server,
    │                                   or failed (exit code and a scrubbed stderr excerpt)
    ├── NotFoundError
    │   └── BackupNotFoundError         no valid backup has that id (404)
    ├── BackupIntegrityError            checksum, signature, decryption, size or contents
    │                                   do not match: the archive is refused (422)
    ├── BackupStoreError            the store (directory, S3) failed: retry later (503)
    ├── RestoreInProgressError          another restore holds the restore lock (409)
    └── ConfirmationRequiredError       a restore without ``confirm == backup_id`` (400)

Messages name what failed and never carry a key, a password or a path outside the backup
directory.
"""

from __future__ import annotations

# Re-exported: a restore without ``confirm`` equal to the backup id raises it.
from bastion.errors import BastionError, ConfirmationRequiredError, NotFoundError

__all__ = [
    "BackupIntegrityError",
    "BackupNotFoundError",
    "BackupStoreError",
    "BackupToolError",
    "ConfirmationRequiredError",
    "RestoreInProgressError",
]


class BackupNotFoundError(NotFoundError):
    """No backup with that id exists in the store, or its manifest is missing or invalid."""

    code = "backup_not_found"


class BackupIntegrityError(BastionError):
    """A backup failed a check and was refused before anything was changed.

    Attributes:
        reason: which check failed: ``"signature"`` (the manifest's HMAC), ``"checksum"``
            (the archive's SHA-256 or size), ``"decrypt"`` (wrong key, or a truncated or
            altered ciphertext), ``"decompress"`` (corrupt stream, or larger than the manifest
            says: a decompression bomb), ``"integrity"`` (the restored copy's integrity
            check), ``"contents"`` (row counts or content hashes differ from the manifest),
            ``"schema"`` (a restore from another migration revision, not allowed).
    """

    code = "backup_integrity"

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class RestoreInProgressError(BastionError):
    """Another restore of this database is running; try again when it has finished."""

    code = "restore_in_progress"
    retryable = False


class BackupToolError(BastionError):
    """``pg_dump`` or ``pg_restore`` is missing, older than the server, or failed.

    Attributes:
        exit_code: the tool's exit status, when it ran.
        stderr_excerpt: the end of its error output, with any password removed.
    """

    code = "backup_tool_error"

    def __init__(
        self, message: str, *, exit_code: int | None = None, stderr_excerpt: str = ""
    ) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.stderr_excerpt = stderr_excerpt


class BackupStoreError(BastionError):
    """The backup store (directory or object storage) failed or could not be reached."""

    code = "backup_store_error"
    retryable = True
