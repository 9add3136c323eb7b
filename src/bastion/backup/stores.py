"""Where archives and manifests live: a local directory, or S3-compatible object storage.

Both publish atomically and in order — the archive first, the manifest last — so a backup
whose upload was interrupted has no manifest and is never listed. Locally each file is written
under a hidden temporary name, fsynced and renamed into place; on S3 the archive goes up as a
multipart upload (which either completes into one object or leaves nothing visible) and the
manifest, a single PUT, only after it succeeded.

Names are the service's own (``<id>.archive``, ``<id>.manifest.json``) and are checked before
any use, so nothing outside the store can be reached through one.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import shutil
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol

from bastion.backup.errors import BackupNotFoundError, BackupStoreError
from bastion.backup.settings import BackupSettings

if TYPE_CHECKING:
    from obstore.store import S3Store as ObstoreS3Store

__all__ = ["BackupStore", "LocalStore", "S3Store", "create_store"]

_NAME = re.compile(r"^[0-9A-Za-z][0-9A-Za-z._-]{0,127}$")
_PART_BYTES: Final = 8 * 1024 * 1024


def _checked(name: str) -> str:
    if not _NAME.fullmatch(name) or ".." in name:
        raise BackupNotFoundError("no backup has that name")
    return name


class BackupStore(Protocol):
    """Put, get, list and delete named files; ``put_file`` is atomic."""

    description: str

    async def put_file(self, name: str, source: Path) -> None:
        """Publish ``source`` as ``name`` all at once (the store may move ``source`` away)."""
        ...

    async def get_file(self, name: str, destination: Path) -> None:
        """Download ``name`` into ``destination``. Raises BackupNotFoundError."""
        ...

    async def put_bytes(self, name: str, data: bytes) -> None:
        """Publish small ``data`` as ``name`` all at once."""
        ...

    async def get_bytes(self, name: str, max_bytes: int) -> bytes:
        """Read small file ``name``. Raises BackupNotFoundError (also when over max_bytes)."""
        ...

    async def list_names(self) -> list[str]:
        """Every published name (temporary and foreign files excluded)."""
        ...

    async def delete(self, name: str) -> None:
        """Delete ``name``; a missing one is not an error."""
        ...


class LocalStore:
    """Backups as files in one directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.description = str(directory)

    async def put_file(self, name: str, source: Path) -> None:
        await asyncio.to_thread(self._publish, _checked(name), source)

    async def get_file(self, name: str, destination: Path) -> None:
        path = self.directory / _checked(name)
        try:
            await asyncio.to_thread(shutil.copyfile, path, destination)
        except FileNotFoundError:
            raise BackupNotFoundError(f"{name} is not in the store") from None

    async def put_bytes(self, name: str, data: bytes) -> None:
        await asyncio.to_thread(self._write_bytes, _checked(name), data)

    async def get_bytes(self, name: str, max_bytes: int) -> bytes:
        path = self.directory / _checked(name)
        try:
            return await asyncio.to_thread(_read_at_most, path, max_bytes)
        except FileNotFoundError:
            raise BackupNotFoundError(f"{name} is not in the store") from None

    async def list_names(self) -> list[str]:
        def names() -> list[str]:
            if not self.directory.is_dir():
                return []
            return [
                entry.name for entry in os.scandir(self.directory) if _NAME.fullmatch(entry.name)
            ]

        return await asyncio.to_thread(names)

    async def delete(self, name: str) -> None:
        path = self.directory / _checked(name)
        await asyncio.to_thread(path.unlink, missing_ok=True)

    def _temporary(self, name: str) -> Path:
        # A leading dot: never listed, never taken for a backup.
        return self.directory / f".{name}.tmp-{secrets.token_hex(4)}"

    def _publish(self, name: str, source: Path) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        temporary = self._temporary(name)
        try:
            try:
                os.link(source, temporary)
            except OSError:
                shutil.copyfile(source, temporary)
            _fsync(temporary)
            os.replace(temporary, self.directory / name)
        finally:
            temporary.unlink(missing_ok=True)
        _fsync_directory(self.directory)

    def _write_bytes(self, name: str, data: bytes) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        temporary = self._temporary(name)
        try:
            with temporary.open("wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, self.directory / name)
        finally:
            temporary.unlink(missing_ok=True)
        _fsync_directory(self.directory)


class S3Store:
    """Backups as objects under a prefix of an S3 bucket (AWS, MinIO, moto…), via obstore."""

    def __init__(self, settings: BackupSettings) -> None:
        try:
            from obstore.store import S3Store as ObstoreS3Store
        except ImportError:
            from bastion.errors import ConfigurationError

            raise ConfigurationError(
                "BACKUP_STORE_URL is s3://… but obstore is not installed: pip install 'bastion[s3]'"
            ) from None
        location = settings.s3_bucket_and_prefix
        assert location is not None
        bucket, prefix = location
        config: dict[str, Any] = {"region": settings.s3_region}
        if settings.s3_endpoint:
            config["endpoint"] = settings.s3_endpoint
        if settings.aws_access_key_id is not None:
            config["access_key_id"] = settings.aws_access_key_id.get_secret_value()
        if settings.aws_secret_access_key is not None:
            config["secret_access_key"] = settings.aws_secret_access_key.get_secret_value()
        client_options: dict[str, Any] = {"timeout": "120s", "connect_timeout": "5s"}
        if (settings.s3_endpoint or "").startswith("http://"):
            client_options["allow_http"] = True
        self._store: ObstoreS3Store = ObstoreS3Store(
            bucket,
            prefix=prefix or None,
            config=config,  # type: ignore[arg-type]
            client_options=client_options,  # type: ignore[arg-type]
            # A few quick retries ride out a dropped connection; a store that stays away
            # fails the backup within about a minute instead of hanging it.
            retry_config={
                "max_retries": 3,
                "retry_timeout": timedelta(seconds=30),
                "backoff": {
                    "init_backoff": timedelta(milliseconds=100),
                    "max_backoff": timedelta(seconds=2),
                    "base": 2,
                },
            },
        )
        self.description = settings.store_url or ""

    async def put_file(self, name: str, source: Path) -> None:
        import obstore

        try:
            await obstore.put_async(
                self._store, _checked(name), source, use_multipart=True, chunk_size=_PART_BYTES
            )
        except Exception as exc:
            raise _store_error("upload", exc) from None

    async def get_file(self, name: str, destination: Path) -> None:
        import obstore
        from obstore.exceptions import NotFoundError

        try:
            result = await obstore.get_async(self._store, _checked(name))
            with destination.open("wb") as file:
                async for chunk in result.stream(min_chunk_size=_PART_BYTES):
                    await asyncio.to_thread(file.write, chunk)
        except NotFoundError:
            raise BackupNotFoundError(f"{name} is not in the store") from None
        except Exception as exc:
            raise _store_error("download", exc) from None

    async def put_bytes(self, name: str, data: bytes) -> None:
        import obstore

        try:
            await obstore.put_async(self._store, _checked(name), data, use_multipart=False)
        except Exception as exc:
            raise _store_error("upload", exc) from None

    async def get_bytes(self, name: str, max_bytes: int) -> bytes:
        import obstore
        from obstore.exceptions import NotFoundError

        try:
            result = await obstore.get_async(self._store, _checked(name))
            if result.meta["size"] > max_bytes:
                raise BackupNotFoundError(f"{name} is too large to be a manifest")
            return bytes(await result.bytes_async())
        except NotFoundError:
            raise BackupNotFoundError(f"{name} is not in the store") from None
        except BackupNotFoundError:
            raise
        except Exception as exc:
            raise _store_error("download", exc) from None

    async def list_names(self) -> list[str]:
        import obstore

        names: list[str] = []
        try:
            async for batch in obstore.list(self._store, chunk_size=1000):
                for meta in batch:
                    name = meta["path"].rsplit("/", 1)[-1]
                    if _NAME.fullmatch(name):
                        names.append(name)
        except Exception as exc:
            raise _store_error("list", exc) from None
        return names

    async def delete(self, name: str) -> None:
        import obstore

        try:
            await obstore.delete_async(self._store, _checked(name))
        except Exception as exc:
            raise _store_error("delete", exc) from None


def create_store(settings: BackupSettings) -> BackupStore:
    """:class:`S3Store` when ``BACKUP_STORE_URL`` is set, else :class:`LocalStore`."""
    if settings.store_url is not None:
        return S3Store(settings)
    return LocalStore(settings.backup_dir)


def _store_error(action: str, exc: Exception) -> BackupStoreError:
    # The class name only: obstore messages can carry request URLs with signatures.
    return BackupStoreError(f"the backup store failed to {action} ({type(exc).__name__})")


def _read_at_most(path: Path, max_bytes: int) -> bytes:
    with path.open("rb") as file:
        data = file.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise BackupNotFoundError(f"{path.name} is too large to be a manifest")
    return data


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _fsync_directory(directory: Path) -> None:
    # The rename is durable only once the directory entry is.
    _fsync(directory)
