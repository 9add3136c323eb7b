"""``BackupService``: create, list, verify, restore and prune backups of one Database.

>>> service = BackupService(database, load_backup_settings())    # doctest: +SKIP
>>> manifest = await service.create()
>>> await service.verify(manifest.id)                             # a scratch restore, checked
>>> await service.restore(manifest.id, confirm=manifest.id)      # replaces the live data

Every backup is checked on the way in and on the way out. Create digests every table at the
dump's own snapshot; verify and restore refuse an archive whose manifest's HMAC, size or
SHA-256 does not match, that does not decrypt, whose scratch restore fails the integrity
check, or whose row counts and content hashes differ from the manifest — all before the live
database is touched. A restore also needs ``confirm`` equal to the backup id, takes the
restore lock, makes a safety backup of the live database first, and swaps the new data in
all at once (see the engines); afterwards the Database's pools are disposed so no connection
keeps a stale view.
"""

from __future__ import annotations

import asyncio
import builtins
import logging
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from datetime import datetime
from pathlib import Path

from bastion.backup.engines import BackupEngine, alembic_revisions, create_engine
from bastion.backup.errors import (
    BackupIntegrityError,
    BackupNotFoundError,
    ConfirmationRequiredError,
    RestoreInProgressError,
)
from bastion.backup.keys import load_encryption, load_signing_key
from bastion.backup.manifest import (
    MAX_MANIFEST_BYTES,
    BackupLabel,
    BackupManifest,
    TableSummary,
    archive_name,
    check_backup_id,
    manifest_name,
    new_backup_id,
    parse_manifest,
    sign,
)
from bastion.backup.pipeline import file_sha256, seal, unseal
from bastion.backup.reports import ProgressCallback, PruneReport, RestoreReport, VerifyReport
from bastion.backup.retention import select_backups_to_delete
from bastion.backup.settings import BackupSettings
from bastion.backup.stores import BackupStore, create_store
from bastion.database import Database
from bastion.errors import BastionError, ConfigurationError
from bastion.health import ComponentHealth, HealthCheck, HealthStatus
from bastion.types import utcnow

__all__ = ["BackupService"]

logger = logging.getLogger("bastion.backup")

_MANIFEST_SUFFIX = ".manifest.json"
_ARCHIVE_SUFFIX = ".archive"


class BackupService:
    """Backups of ``database`` as ``settings`` describe (store, keys, retention).

    Built once at the edge, next to the Database. Construction reads the keys, so a bad or
    missing key fails here, at start.

    Raises (from the constructor):
        ConfigurationError: an in-memory SQLite database; a bad encryption key; a signing key
            file that cannot be created or read; obstore missing for an s3:// store.
    """

    def __init__(
        self,
        database: Database,
        settings: BackupSettings,
        *,
        store: BackupStore | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.database = database
        self.settings = settings
        self.store = store if store is not None else create_store(settings)
        self.engine: BackupEngine = create_engine(database, pg_bin_dir=settings.pg_bin_dir)
        self._encryption = load_encryption(settings)
        self._signing_key = load_signing_key(settings)
        self._clock = clock

    def __repr__(self) -> str:
        return f"BackupService(store={self.store.description!r}, backend={self.engine.backend!r})"

    async def create(
        self, *, label: BackupLabel = "manual", progress: ProgressCallback | None = None
    ) -> BackupManifest:
        """Dump the live database, seal it, publish archive then manifest; return the manifest.

        Raises:
            BackupToolError: pg_dump failed or is older than the server.
            BackupStoreError: the store failed; nothing valid was published.
            DatabaseUnavailableError, QueryError: reading the database failed.
        """
        started = time.perf_counter()
        now = self._clock()
        backup_id = new_backup_id(now)
        async with self._work_dir() as work:
            dump = work / "dump"
            info = await self.engine.dump(dump)
            dump_bytes = dump.stat().st_size
            _report(progress, "dump", dump_bytes, dump_bytes)
            archive = work / "archive"
            sealed = await asyncio.to_thread(
                seal,
                dump,
                archive,
                encryption=self._encryption,
                level=self.settings.compression_level,
                progress=_stage(progress, "compress"),
            )
            manifest = sign(
                BackupManifest(
                    id=backup_id,
                    label=label,
                    created_at=now,
                    backend=self.engine.backend,
                    server_version=info.server_version,
                    alembic_revisions=info.alembic_revisions,
                    tables={
                        name: TableSummary(rows=digest.rows, sha256=digest.sha256)
                        for name, digest in info.tables.items()
                    },
                    dump_bytes=dump_bytes,
                    archive_bytes=sealed.size,
                    archive_sha256=sealed.sha256,
                    encryption="none" if self._encryption is None else "age-x25519",
                    recipient=None if self._encryption is None else self._encryption.recipient_text,
                    duration_s=round(time.perf_counter() - started, 3),
                ),
                self._signing_key,
            )
            _report(progress, "upload", 0, sealed.size)
            await self.store.put_file(archive_name(backup_id), archive)
            try:
                # Last: until the manifest exists, the backup does not.
                await self.store.put_bytes(manifest_name(backup_id), manifest.to_json())
            except BaseException:
                await _quietly(self.store.delete(archive_name(backup_id)))
                raise
            _report(progress, "upload", sealed.size, sealed.size)
        logger.info(
            "backup %s created: %d tables, %d rows, %d bytes stored",
            backup_id,
            len(manifest.tables),
            manifest.total_rows,
            manifest.archive_bytes,
        )
        return manifest

    async def list(self) -> list[BackupManifest]:
        """Every valid backup, newest first; unauthenticated or partial ones are left out.

        Raises:
            BackupStoreError: the store could not be listed.
        """
        manifests = []
        for backup_id in await self._manifest_ids():
            try:
                manifests.append(await self.get(backup_id))
            except (BackupIntegrityError, BackupNotFoundError) as exc:
                logger.warning("backup %s is not listed: %s", backup_id, exc.message)
        return sorted(manifests, key=lambda item: (item.created_at, item.id), reverse=True)

    async def list_incomplete(self) -> builtins.list[str]:
        """Ids that have an archive but no manifest: interrupted backups, never valid."""
        names = set(await self.store.list_names())
        return sorted(
            name.removesuffix(_ARCHIVE_SUFFIX)
            for name in names
            if name.endswith(_ARCHIVE_SUFFIX)
            and manifest_name(name.removesuffix(_ARCHIVE_SUFFIX)) not in names
        )

    async def get(self, backup_id: str) -> BackupManifest:
        """The authenticated manifest of ``backup_id``.

        Raises:
            BackupNotFoundError: a malformed id, or no such backup.
            BackupIntegrityError: the manifest is not authentic (``reason="signature"``).
        """
        check_backup_id(backup_id)
        data = await self.store.get_bytes(manifest_name(backup_id), MAX_MANIFEST_BYTES)
        return parse_manifest(data, self._signing_key, expected_id=backup_id)

    async def verify(
        self, backup_id: str, *, progress: ProgressCallback | None = None
    ) -> VerifyReport:
        """Check a backup end to end by restoring it into a scratch database.

        Raises:
            BackupNotFoundError: no such backup.
            BackupIntegrityError: a check failed; ``reason`` says which.
            ConfigurationError: the backup is encrypted and BACKUP_ENCRYPTION_KEY is not set.
        """
        started = time.perf_counter()
        manifest = await self.get(backup_id)
        async with self._work_dir() as work:
            await self._fetch_and_check(manifest, work, progress)
        return VerifyReport(
            backup_id=manifest.id,
            checks=["signature", "checksum", "decrypt", "decompress", "integrity", "contents"],
            tables={name: table.rows for name, table in manifest.tables.items()},
            duration_s=round(time.perf_counter() - started, 3),
        )

    async def restore(
        self,
        backup_id: str,
        *,
        confirm: str | None = None,
        dry_run: bool = False,
        allow_schema_change: bool = False,
        progress: ProgressCallback | None = None,
    ) -> RestoreReport:
        """Replace the live database's contents with backup ``backup_id``.

        A backup taken at another migration revision than the live database's is refused
        unless ``allow_schema_change``: the running code expects the live schema, and on
        PostgreSQL ``pg_restore --clean`` leaves tables the backup does not know in place.

        A dry run only reads the (authenticated) manifest and reports what would be restored,
        and where. A real restore checks the archive fully first, then makes a safety backup,
        then swaps the data in all at once.

        Raises:
            ConfirmationRequiredError: not a dry run and ``confirm != backup_id``.
            RestoreInProgressError: another restore of this database is running.
            BackupNotFoundError, BackupIntegrityError: as for :meth:`verify`, or
                ``reason="schema"``: another migration revision; nothing changed.
            BackupToolError: pg_restore failed; the live database was rolled back.
        """
        started = time.perf_counter()
        manifest = await self.get(backup_id)
        report = RestoreReport(
            backup_id=manifest.id,
            dry_run=dry_run,
            target=self.database.settings.display_url,
            backend=self.engine.backend,
            tables={name: table.rows for name, table in manifest.tables.items()},
            alembic_revisions=list(manifest.alembic_revisions),
        )
        if manifest.backend != self.engine.backend:
            raise BackupIntegrityError(
                f"backup {manifest.id} is of a {manifest.backend} database; the target is "
                f"{self.engine.backend}",
                reason="contents",
            )
        if dry_run:
            return report
        if confirm != manifest.id:
            raise ConfirmationRequiredError(
                f"restoring replaces the live database: confirm with the backup id {manifest.id}"
            )
        if not allow_schema_change:
            await self._require_same_schema(manifest)
        async with self.engine.lock("restore") as taken:
            if not taken:
                raise RestoreInProgressError("another restore of this database is running")
            async with self._work_dir() as work:
                dump = await self._fetch_and_check(manifest, work, progress)
                _report(progress, "safety-backup", 0, 1)
                safety = await self.create(label="pre-restore")
                _report(progress, "safety-backup", 1, 1)
                logger.warning(
                    "restoring backup %s into %s (safety backup %s)",
                    manifest.id,
                    report.target,
                    safety.id,
                )
                await self.engine.restore(dump, work, _stage(progress, "restore"))
        # Pooled connections may hold cached state of the old data (prepared statements,
        # SQLite schema): start afresh.
        for engine in self.database.engines:
            await engine.dispose()
        logger.warning("restored backup %s into %s", manifest.id, report.target)
        return RestoreReport(
            **{
                **report.to_dict(),
                "safety_backup_id": safety.id,
                "duration_s": round(time.perf_counter() - started, 3),
            }
        )

    async def _require_same_schema(self, manifest: BackupManifest) -> None:
        async with self.database.read_connection() as connection:
            live = await alembic_revisions(connection)
        if tuple(sorted(manifest.alembic_revisions)) != tuple(sorted(live)):
            raise BackupIntegrityError(
                f"backup {manifest.id} is at schema revision "
                f"{', '.join(manifest.alembic_revisions) or '(none)'}, the database at "
                f"{', '.join(live) or '(none)'}: migrate the database to the backup's revision "
                "first, or allow the schema change explicitly",
                reason="schema",
            )

    async def prune(self, *, dry_run: bool = False) -> PruneReport:
        """Delete the backups ``BACKUP_RETENTION`` does not keep (manifest first).

        Raises:
            BackupStoreError: the store failed; what was deleted so far stays deleted.
        """
        policy = self.settings.retention_policy
        keep, delete = select_backups_to_delete(await self.list(), policy)
        if not dry_run:
            for manifest in delete:
                # Manifest first: a half-deleted backup is then merely incomplete, not valid.
                await self.store.delete(manifest_name(manifest.id))
                await self.store.delete(archive_name(manifest.id))
                logger.info("backup %s pruned", manifest.id)
        return PruneReport(
            dry_run=dry_run,
            policy=str(policy),
            kept=[manifest.id for manifest in keep],
            deleted=[manifest.id for manifest in delete],
        )

    async def latest(self) -> BackupManifest | None:
        """The newest valid backup, or ``None``."""
        manifests = await self.list()
        return manifests[0] if manifests else None

    async def latest_age_s(self) -> float | None:
        """Seconds since the newest valid backup was made, or ``None`` when there is none."""
        newest = await self.latest()
        if newest is None:
            return None
        return max((self._clock() - newest.created_at).total_seconds(), 0.0)

    def health_check(self) -> HealthCheck:
        """A :class:`~bastion.HealthChecker` check named ``backup``.

        Degraded when there is no valid backup, or the newest is older than
        ``BACKUP_MAX_AGE_S``; unhealthy only when the store cannot be read.
        """

        async def backup() -> ComponentHealth:
            try:
                newest = await self.latest()
            except BastionError as exc:
                return ComponentHealth("backup", HealthStatus.UNHEALTHY, error=exc.code)
            if newest is None:
                return ComponentHealth(
                    "backup", HealthStatus.DEGRADED, details={"latest": None}, error="no_backup"
                )
            age_s = max((self._clock() - newest.created_at).total_seconds(), 0.0)
            details = {
                "latest": newest.id,
                "age_s": round(age_s, 1),
                "max_age_s": self.settings.max_age_s,
            }
            if age_s > self.settings.max_age_s:
                return ComponentHealth(
                    "backup", HealthStatus.DEGRADED, details=details, error="backup_too_old"
                )
            return ComponentHealth("backup", HealthStatus.HEALTHY, details=details)

        return backup

    async def _manifest_ids(self) -> builtins.list[str]:
        return [
            name.removesuffix(_MANIFEST_SUFFIX)
            for name in await self.store.list_names()
            if name.endswith(_MANIFEST_SUFFIX)
        ]

    async def _fetch_and_check(
        self, manifest: BackupManifest, work: Path, progress: ProgressCallback | None
    ) -> Path:
        """Download, authenticate, unseal and check ``manifest``'s archive; return the dump."""
        if manifest.encryption != "none":
            if self._encryption is None:
                raise ConfigurationError(
                    f"backup {manifest.id} is encrypted: set BACKUP_ENCRYPTION_KEY to read it"
                )
            if manifest.recipient != self._encryption.recipient_text:
                raise BackupIntegrityError(
                    f"backup {manifest.id} was encrypted for another key than "
                    "BACKUP_ENCRYPTION_KEY",
                    reason="decrypt",
                )
        archive = work / "archive"
        _report(progress, "download", 0, manifest.archive_bytes)
        await self.store.get_file(manifest.archive_name, archive)
        _report(progress, "download", manifest.archive_bytes, manifest.archive_bytes)
        size = archive.stat().st_size
        if size != manifest.archive_bytes or (
            await asyncio.to_thread(file_sha256, archive) != manifest.archive_sha256
        ):
            raise BackupIntegrityError(
                f"backup {manifest.id}: the archive's checksum does not match its manifest "
                "(corrupt, truncated or replaced)",
                reason="checksum",
            )
        dump = work / "dump"
        await asyncio.to_thread(
            unseal,
            archive,
            dump,
            encryption=None if manifest.encryption == "none" else self._encryption,
            expected_bytes=manifest.dump_bytes,
            progress=_stage(progress, "decrypt"),
        )
        archive.unlink()
        _report(progress, "check", 0, 1)
        check = await self.engine.check_copy(dump, work)
        if check.problems:
            raise BackupIntegrityError(
                f"backup {manifest.id}: the restored copy fails the integrity check: "
                + "; ".join(check.problems[:5]),
                reason="integrity",
            )
        expected = {name: (table.rows, table.sha256) for name, table in manifest.tables.items()}
        found = {name: (digest.rows, digest.sha256) for name, digest in check.tables.items()}
        if found != expected:
            differing = sorted(
                name
                for name in expected.keys() | found.keys()
                if expected.get(name) != found.get(name)
            )
            raise BackupIntegrityError(
                f"backup {manifest.id}: the restored copy differs from the manifest in "
                f"{', '.join(differing[:10])}",
                reason="contents",
            )
        _report(progress, "check", 1, 1)
        return dump

    @asynccontextmanager
    async def _work_dir(self) -> AsyncIterator[Path]:
        # Inside BACKUP_DIR (same file system: the local store publishes by hard link), under
        # a hidden name that no store lists.
        self.settings.backup_dir.mkdir(parents=True, exist_ok=True)
        path = Path(tempfile.mkdtemp(prefix=".work-", dir=self.settings.backup_dir))
        try:
            yield path
        finally:
            await asyncio.to_thread(shutil.rmtree, path, ignore_errors=True)


def _report(progress: ProgressCallback | None, stage: str, done: int, total: int) -> None:
    if progress is not None:
        progress(stage, done, total)


def _stage(progress: ProgressCallback | None, stage: str) -> Callable[[int, int], None] | None:
    if progress is None:
        return None
    return lambda done, total: progress(stage, done, total)


async def _quietly(operation: Awaitable[None]) -> None:
    # Cleanup after a failure: the failure is the news, not a second one while tidying up.
    with suppress(Exception):
        await operation
