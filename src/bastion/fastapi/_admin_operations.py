"""Backup, restore and maintenance operations on the admin router.

Long operations (backup, verify, restore, optimize) answer ``202`` with a job at once; the
client polls ``GET jobs/{id}`` (see :mod:`bastion.jobs`). Cheap ones (listing backups, a
restore's dry run, prune, integrity) answer directly. Every operation:

* is behind the admin token (the router's :func:`require_admin`),
* is written to the audit trail when asked for and again when it ends (:mod:`bastion.audit`),
* if expensive, counts against a per-client rate limit (429 with ``Retry-After``),
* addresses backups only by the ids the server made (a malformed id is simply not found),
* shows errors by their stable code; never a path, key or password.

A restore refuses unless ``confirm`` repeats the backup id, and two never overlap (409).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Annotated, Any, Final

from fastapi import APIRouter, Depends, HTTPException, Path
from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import JSONResponse

from bastion.audit import AuditLog
from bastion.backup import BackupService, BackupSettings
from bastion.backup.reports import ProgressCallback
from bastion.database import Database
from bastion.errors import BastionError
from bastion.fastapi._admin_limits import DEFAULT_ADMIN_RATE, AdminRateLimit
from bastion.fastapi._backups import backup_service_of
from bastion.fastapi._dependencies import get_database
from bastion.jobs import Job, JobProgress, JobRegistry
from bastion.maintenance.integrity import check_integrity
from bastion.maintenance.optimize import optimize

__all__ = ["AdminOperations", "add_operation_routes", "client_actor"]

_ID_MAX_LENGTH: Final = 64
BackupId = Annotated[str, Path(max_length=_ID_MAX_LENGTH)]
JobId = Annotated[str, Path(max_length=_ID_MAX_LENGTH)]
DatabaseDep = Annotated[Database, Depends(get_database)]


class RestoreRequest(BaseModel):
    """``POST restore``: which backup, the confirmation, and whether to only look."""

    model_config = ConfigDict(extra="forbid")

    backup_id: str = Field(max_length=_ID_MAX_LENGTH)
    confirm: str | None = Field(
        default=None,
        max_length=_ID_MAX_LENGTH,
        description="The backup id again: restoring replaces the live database.",
    )
    dry_run: bool = False
    allow_schema_change: bool = Field(
        default=False,
        description="Restore even though the backup is at another migration revision.",
    )


class OptimizeRequest(BaseModel):
    """``POST optimize``: with ``vacuum`` the database is also rewritten (slow, locks)."""

    model_config = ConfigDict(extra="forbid")

    vacuum: bool = False


class PruneRequest(BaseModel):
    """``POST prune``: with ``dry_run`` nothing is deleted, only reported."""

    model_config = ConfigDict(extra="forbid")

    dry_run: bool = False


class AdminOperations:
    """What the operation routes share: jobs, the audit trail, the rate limit, the backups.

    Args:
        backups: where and how backups are kept (``None``: the defaults of
            :class:`~bastion.backup.BackupSettings`, ``BACKUP_DIR=./data/backups``).
        rate: the ``limits`` rate for expensive operations per client and operation.
    """

    def __init__(self, backups: BackupSettings | None = None, *, rate: str = DEFAULT_ADMIN_RATE):
        self.backup_settings = backups
        self.jobs = JobRegistry()
        self.audit = AuditLog()
        self.limit = AdminRateLimit(rate)
        self._services: dict[int, BackupService] = {}

    def backup_service(self, database: Database, request: Request) -> BackupService:
        """The app's BackupService (see :func:`run_backups`), or one built on first use.

        Raises:
            ConfigurationError: the backup settings are unusable (bad key, in-memory SQLite).
        """
        running = backup_service_of(request)
        if running is not None and running.database is database:
            return running
        service = self._services.get(id(database))
        if service is None or service.database is not database:
            settings = (
                self.backup_settings if self.backup_settings is not None else BackupSettings()
            )
            service = BackupService(database, settings)
            self._services = {id(database): service}
        return service

    async def audited(
        self,
        request: Request,
        action: str,
        target: str | None,
        operation: Callable[[], Awaitable[Any]],
    ) -> Any:
        """Run ``operation`` between a "requested" and an outcome audit record.

        Raises:
            Whatever ``operation`` raises, after recording it as failed (or refused, for an
            HTTP error such as 429).
        """
        actor = client_actor(request)
        self.audit.record(actor=actor, action=action, target=target, outcome="requested")
        try:
            result = await operation()
        except BaseException as exc:
            outcome, detail = _failure(exc)
            self.audit.record(
                actor=actor, action=action, target=target, outcome=outcome, detail=detail
            )
            raise
        accepted = isinstance(result, Job)
        self.audit.record(
            actor=actor,
            action=action,
            target=target,
            outcome="accepted" if accepted else "succeeded",
            detail=result.id if accepted else None,
        )
        return result

    def submit(
        self,
        request: Request,
        kind: str,
        work: Callable[[ProgressCallback], Awaitable[Mapping[str, Any] | None]],
        *,
        target: str | None = None,
        exclusive: str | None = None,
    ) -> Job:
        """Start ``work`` as a job whose end is audited too.

        Raises:
            JobConflictError: a job of the same exclusive group is running (409).
        """
        actor = client_actor(request)

        async def run(progress: JobProgress) -> Mapping[str, Any] | None:
            def staged(stage: str, done: int, total: int) -> None:
                progress(done, total)

            try:
                result = await work(staged)
            except BaseException as exc:
                outcome, detail = _failure(exc)
                self.audit.record(
                    actor=actor, action=kind, target=target, outcome=outcome, detail=detail
                )
                raise
            self.audit.record(actor=actor, action=kind, target=target, outcome="succeeded")
            return result

        return self.jobs.submit(kind, run, target=target, exclusive=exclusive)


def add_operation_routes(router: APIRouter, operations: AdminOperations) -> None:
    """Add the backup, restore, maintenance, job and audit routes to the admin ``router``."""
    ops = operations

    @router.post("/backup", status_code=202)
    async def create_backup(request: Request, database: DatabaseDep) -> dict[str, Any]:
        """Start a backup (a job); poll ``GET jobs/{id}`` for its manifest."""

        async def start() -> Job:
            await ops.limit.check(request, "backup")
            service = ops.backup_service(database, request)

            async def work(progress: ProgressCallback) -> Mapping[str, Any]:
                return (await service.create(progress=progress)).to_dict()

            return ops.submit(request, "backup.create", work, exclusive="backup")

        job: Job = await ops.audited(request, "backup.create", None, start)
        return job.to_dict()

    @router.get("/backups")
    async def list_backups(request: Request, database: DatabaseDep) -> dict[str, Any]:
        """Valid backups, newest first, and ids of incomplete ones (never valid)."""
        service = ops.backup_service(database, request)
        return {
            "backups": [manifest.to_dict() for manifest in await service.list()],
            "incomplete": await service.list_incomplete(),
        }

    @router.get("/backups/{backup_id}")
    async def get_backup(
        request: Request, backup_id: BackupId, database: DatabaseDep
    ) -> dict[str, Any]:
        """One backup's authenticated manifest (404 for an unknown or malformed id)."""
        return (await ops.backup_service(database, request).get(backup_id)).to_dict()

    @router.post("/backups/{backup_id}/verify", status_code=202)
    async def verify_backup(
        request: Request, backup_id: BackupId, database: DatabaseDep
    ) -> dict[str, Any]:
        """Start a full verification (scratch restore, integrity, contents) as a job."""

        async def start() -> Job:
            await ops.limit.check(request, "verify")
            service = ops.backup_service(database, request)
            await service.get(backup_id)  # unknown or forged: refused now, not in the job

            async def work(progress: ProgressCallback) -> Mapping[str, Any]:
                return (await service.verify(backup_id, progress=progress)).to_dict()

            return ops.submit(request, "backup.verify", work, target=backup_id)

        job: Job = await ops.audited(request, "backup.verify", backup_id, start)
        return job.to_dict()

    @router.post("/prune")
    async def prune_backups(
        request: Request, database: DatabaseDep, body: PruneRequest | None = None
    ) -> dict[str, Any]:
        """Delete the backups ``BACKUP_RETENTION`` does not keep (or list them, dry run)."""

        async def run() -> dict[str, Any]:
            await ops.limit.check(request, "prune")
            return (
                await ops.backup_service(database, request).prune(
                    dry_run=body is not None and body.dry_run
                )
            ).to_dict()

        result: dict[str, Any] = await ops.audited(request, "backup.prune", None, run)
        return result

    @router.post("/restore", status_code=202)
    async def restore(
        request: Request, body: RestoreRequest, database: DatabaseDep
    ) -> JSONResponse:
        """Restore a backup into the live database (a job), or with ``dry_run`` say what it
        would do (200). Needs ``confirm`` equal to ``backup_id``; 409 while one runs."""

        async def start() -> Job | dict[str, Any]:
            await ops.limit.check(request, "restore")
            service = ops.backup_service(database, request)
            # Checked now, so a bad id or a missing confirmation is an answer, not a job.
            report = await service.restore(body.backup_id, dry_run=True)
            if body.dry_run:
                return report.to_dict()
            if body.confirm != body.backup_id:
                raise HTTPException(
                    400, "restoring replaces the live database: set confirm to the backup id"
                )

            async def work(progress: ProgressCallback) -> Mapping[str, Any]:
                restored = await service.restore(
                    body.backup_id,
                    confirm=body.confirm,
                    allow_schema_change=body.allow_schema_change,
                    progress=progress,
                )
                # Reads cached from the replaced data must not be served any more.
                cache = getattr(request.app.state, "cache", None)
                cleared = await cache.clear() if cache is not None else None
                return {**restored.to_dict(), "cache_cleared": cleared}

            return ops.submit(
                request, "backup.restore", work, target=body.backup_id, exclusive="restore"
            )

        outcome = await ops.audited(request, "backup.restore", body.backup_id, start)
        if isinstance(outcome, Job):
            return JSONResponse(outcome.to_dict(), status_code=202)
        return JSONResponse(outcome, status_code=200)

    @router.get("/integrity")
    async def integrity(request: Request, database: DatabaseDep) -> JSONResponse:
        """Integrity checks (SQLite integrity/foreign keys; PostgreSQL amcheck, orphans).
        200 when all passed, 409 with the problems when not."""

        async def run() -> dict[str, Any]:
            await ops.limit.check(request, "integrity")
            return (await check_integrity(database)).to_dict()

        report: dict[str, Any] = await ops.audited(request, "integrity", None, run)
        return JSONResponse(report, status_code=200 if report["ok"] else 409)

    @router.post("/optimize", status_code=202)
    async def optimize_database(
        request: Request, database: DatabaseDep, body: OptimizeRequest | None = None
    ) -> dict[str, Any]:
        """ANALYZE (and with ``vacuum``, VACUUM) the database, as a job."""

        async def start() -> Job:
            await ops.limit.check(request, "optimize")

            async def work(progress: ProgressCallback) -> Mapping[str, Any]:
                return (await optimize(database, vacuum=body is not None and body.vacuum)).to_dict()

            return ops.submit(request, "optimize", work, exclusive="optimize")

        job: Job = await ops.audited(request, "optimize", None, start)
        return job.to_dict()

    @router.get("/jobs")
    async def list_jobs() -> dict[str, Any]:
        """The jobs this worker remembers, newest first."""
        return {"jobs": [job.to_dict() for job in ops.jobs.list()]}

    @router.get("/jobs/{job_id}")
    async def get_job(job_id: JobId) -> dict[str, Any]:
        """One job's state, progress and outcome (404 once forgotten or on another worker)."""
        return ops.jobs.get(job_id).to_dict()

    @router.get("/audit")
    async def audit() -> dict[str, Any]:
        """The latest audit records this worker kept, oldest first: authenticated actions,
        and apart from them, refused unauthenticated calls."""
        return {
            "records": [record.to_dict() for record in ops.audit.recent],
            "refusals": [record.to_dict() for record in ops.audit.refusals],
        }


def _failure(exc: BaseException) -> tuple[str, str]:
    """The audit outcome and detail of an operation that raised ``exc``."""
    if isinstance(exc, HTTPException):
        return "refused", str(exc.status_code)  # refused before it ran (429, 400…)
    if isinstance(exc, BastionError):
        return "failed", exc.code
    return "failed", "internal"  # the message may carry anything: never audited


def client_actor(request: Request, *, authenticated: bool = True) -> str:
    """Who is calling, for the audit trail: ``admin@<address>`` (or ``anonymous@…``)."""
    # One admin token means one identity; the address tells calls apart.
    client = request.client.host if request.client is not None else "unknown"
    return f"{'admin' if authenticated else 'anonymous'}@{client}"
