"""Backups as part of an app's life: one BackupService, its health check, and the schedule."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from starlette.requests import HTTPConnection

from bastion.backup import BackupScheduler, BackupService, BackupSettings
from bastion.database import Database

__all__ = ["backup_service_of", "run_backups"]

logger = logging.getLogger("bastion.backup")


@asynccontextmanager
async def run_backups(
    state: Any, database: Database, settings: BackupSettings
) -> AsyncIterator[None]:
    """With ``BACKUP_INTERVAL_S`` > 0, back up on that schedule for the block.

    The schedule's BackupService goes on ``state.backups`` (the admin API uses it), its
    ``backup`` health check joins ``/health/ready`` (degraded when the newest backup is older
    than ``BACKUP_MAX_AGE_S``), and one worker backs up per interval, however many run.
    Without a schedule nothing starts: backups made on demand carry no promise of freshness
    for health to check, and the admin API builds its service on first use.

    Raises:
        ConfigurationError: the backup settings are unusable (see :class:`BackupService`).
    """
    if settings.interval_s <= 0:
        yield
        return
    service = BackupService(database, settings)
    state.backups = service
    state.health_checks = (*getattr(state, "health_checks", ()), service.health_check())
    scheduler = BackupScheduler(service, settings.interval_s, settings.jitter_s)
    scheduler.start()
    logger.info(
        "backups scheduled every %.0f s (+ up to %.0f s)", settings.interval_s, settings.jitter_s
    )
    try:
        yield
    finally:
        await scheduler.stop()


def backup_service_of(connection: HTTPConnection) -> BackupService | None:
    """The BackupService :func:`run_backups` put on the app, if it ran."""
    service = getattr(connection.app.state, "backups", None)
    return service if isinstance(service, BackupService) else None
