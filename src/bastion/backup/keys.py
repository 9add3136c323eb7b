"""The keys of a backup: the HMAC signing key and the age identity that encrypts.

The signing key authenticates manifests (and, through the archive's SHA-256 inside them, the
archives): only backups this service made are ever restored. When ``BACKUP_SIGNING_KEY`` is
not set, a random key is generated once into a 0600 file beside ``BACKUP_DIR`` — outside it,
so whoever can write backups there cannot also read the key that vouches for them. The file
appears complete or not at all (written and synced under a temporary name, then linked into
place), so workers starting together agree on one key and never read a partial file.
"""

from __future__ import annotations

import logging
import os
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyrage  # type: ignore[import-untyped]

from bastion.backup.settings import BackupSettings
from bastion.errors import ConfigurationError

__all__ = ["Encryption", "load_encryption", "load_signing_key"]

logger = logging.getLogger("bastion.backup")

_KEY_BYTES = 32


def load_signing_key(settings: BackupSettings) -> bytes:
    """``BACKUP_SIGNING_KEY``, or the generated key file's content (made on first use).

    Raises:
        ConfigurationError: the key file cannot be created or read, or is too short.
    """
    if settings.signing_key is not None:
        return settings.signing_key.get_secret_value().encode()
    path = settings.signing_key_file
    if not path.exists():
        try:
            _create_key_file(path)
        except OSError as exc:
            raise ConfigurationError(
                f"cannot create the backup signing key file {path} ({exc.strerror}); "
                "set BACKUP_SIGNING_KEY"
            ) from None
    try:
        key = path.read_text().strip()
    except OSError as exc:
        raise ConfigurationError(
            f"cannot read the backup signing key file {path} ({exc.strerror})"
        ) from None
    if len(key) < 32:
        raise ConfigurationError(f"the backup signing key file {path} holds a key too short")
    return key.encode()


def _create_key_file(path: Path) -> None:
    """Put a new random key at ``path`` unless another worker got there first.

    The key is written and synced under a temporary name in the same directory, then
    hard-linked into place: ``link`` fails if ``path`` exists, so exactly one worker's complete
    file wins and the others read it (never a half-written one, as with create-then-write).

    Raises:
        OSError: the directory or the file cannot be made.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # 0600
    try:
        with os.fdopen(descriptor, "w") as file:
            file.write(secrets.token_hex(_KEY_BYTES) + "\n")
            file.flush()
            os.fsync(file.fileno())
        try:
            os.link(temporary, path)
        except FileExistsError:
            return  # lost the race: the winner's key is complete and is the one to use
    finally:
        os.unlink(temporary)
    _sync_directory(path.parent)
    logger.warning(
        "generated a backup signing key in %s; keep it (and back it up apart from the "
        "backups), or set BACKUP_SIGNING_KEY",
        path,
    )


def _sync_directory(directory: Path) -> None:
    # The new name must survive a crash too, or a restart would generate another key and
    # distrust every backup signed with this one.
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@dataclass(frozen=True, slots=True)
class Encryption:
    """An age X25519 identity (to decrypt) and its recipient (to encrypt).

    ``repr`` shows the public recipient only.
    """

    identity: Any
    recipient: Any

    @property
    def recipient_text(self) -> str:
        """The public key, ``age1…``: safe to store in a manifest."""
        return str(self.recipient)

    def __repr__(self) -> str:
        return f"Encryption(recipient={self.recipient_text!r})"


def load_encryption(settings: BackupSettings) -> Encryption | None:
    """The identity of ``BACKUP_ENCRYPTION_KEY``, or ``None`` when backups are not encrypted.

    Raises:
        ConfigurationError: the key is not a valid age identity (its value is not shown).
    """
    if settings.encryption_key is None:
        return None
    try:
        identity = pyrage.x25519.Identity.from_str(
            settings.encryption_key.get_secret_value().strip()
        )
    except Exception:
        raise ConfigurationError(
            "BACKUP_ENCRYPTION_KEY is not a valid age X25519 identity (AGE-SECRET-KEY-1…)"
        ) from None
    return Encryption(identity=identity, recipient=identity.to_public())
