"""A backup every ``interval_s`` (plus up to ``jitter_s`` at random), by exactly one worker.

Every worker of a service runs a scheduler; at each tick each one tries the backup lock
(PostgreSQL advisory lock, or a file lock beside the SQLite file) without waiting. The one
that gets it looks at the newest backup in the store and makes a new one only if that is
older than the interval (less the jitter, so a slightly early tick still counts): a worker
that comes second in the same interval finds a fresh backup and does nothing. The jitter
spreads the ticks of many services over time.

>>> scheduler = BackupScheduler(service, interval_s=3600, jitter_s=300)  # doctest: +SKIP
>>> scheduler.start()           # in the lifespan
>>> await scheduler.stop()
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from datetime import datetime

from bastion.backup.manifest import BackupManifest
from bastion.backup.service import BackupService
from bastion.errors import BastionError
from bastion.types import utcnow

__all__ = ["BackupScheduler"]

logger = logging.getLogger("bastion.backup")


class BackupScheduler:
    """Runs :meth:`BackupService.create` on a schedule, once per interval across workers.

    Raises:
        ValueError: ``interval_s`` is not positive or ``jitter_s`` is negative.
    """

    def __init__(
        self,
        service: BackupService,
        interval_s: float,
        jitter_s: float = 0.0,
        *,
        clock: Callable[[], datetime] = utcnow,
        prune: bool = True,
        on_backup: Callable[[BackupManifest], None] | None = None,
    ) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be positive")
        if jitter_s < 0:
            raise ValueError("jitter_s must not be negative")
        self.service = service
        self.interval_s = interval_s
        self.jitter_s = min(jitter_s, interval_s / 2)
        self.prune = prune
        self.on_backup = on_backup
        """Called with each backup this scheduler made (for metrics, logs, tests)."""
        self._clock = clock
        self._task: asyncio.Task[None] | None = None
        self.runs = 0
        """Backups this scheduler made."""

    def start(self) -> None:
        """Start ticking in the background (idempotent)."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._loop(), name="bastion-backup-scheduler")

    async def stop(self) -> None:
        """Stop ticking; a backup in progress is cancelled (it publishes nothing then)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def tick(self) -> BackupManifest | None:
        """Make a backup if this worker gets the lock and none is recent; return it if made."""
        async with self.service.engine.lock("backup") as taken:
            if not taken:
                return None
            newest = await self.service.latest()
            due_after_s = self.interval_s - self.jitter_s
            if newest is not None:
                age_s = (self._clock() - newest.created_at).total_seconds()
                if age_s < due_after_s:
                    return None
            manifest = await self.service.create(label="scheduled")
            self.runs += 1
        if self.on_backup is not None:
            self.on_backup(manifest)
        if self.prune:
            await self.service.prune()
        return manifest

    async def _loop(self) -> None:
        while True:
            # Random jitter, not for security: spreading workers' ticks over time.
            await asyncio.sleep(self.interval_s + random.uniform(0, self.jitter_s))  # noqa: S311
            try:
                await self.tick()
            except BastionError as exc:
                logger.error("scheduled backup failed: %s", exc.message)
            except Exception:
                logger.exception("scheduled backup failed")
