"""The FastAPI lifespan that starts and closes a :class:`~bastion.Database`."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager

from starlette.types import ASGIApp

from bastion._startup_heap import freeze_startup_heap
from bastion.backup import BackupSettings
from bastion.cache.settings import CacheSettings
from bastion.database import Database
from bastion.fastapi._backups import run_backups
from bastion.loop_lag import LoopLagMonitor
from bastion.migrations import upgrade
from bastion.settings import DatabaseSettings

__all__ = ["database_lifespan"]


def database_lifespan(
    settings: DatabaseSettings,
    *,
    migrations: str | None = None,
    cache: CacheSettings | None = None,
    backups: BackupSettings | None = None,
    freeze_heap: bool = False,
    gc_young_threshold: int | None = None,
) -> Callable[[ASGIApp], AbstractAsyncContextManager[None]]:
    """A lifespan that starts a Database, stores it on ``app.state.database``, and closes it.

    It also runs a :class:`~bastion.loop_lag.LoopLagMonitor` on ``app.state.loop_lag``, whose
    figures ``/health/ready`` reports.

    With ``migrations`` (an Alembic ``script_location`` such as ``"myservice:migrations"``),
    the database is upgraded to head before the app takes requests.

    With ``cache`` (:class:`~bastion.cache.CacheSettings`), a cache (Redis, or none without
    ``REDIS_URL``) and a live-update hub run on ``app.state.cache`` / ``app.state.live``;
    see :mod:`bastion.fastapi._cache`.

    With ``backups`` (:class:`~bastion.backup.BackupSettings`), a BackupService runs on
    ``app.state.backups`` (used by the admin API), its ``backup`` health check joins
    ``/health/ready``, and ``BACKUP_INTERVAL_S`` > 0 schedules backups.

    With ``freeze_heap``, the first start-up in the process ends with a full garbage
    collection, after which every object still alive moves where later collections do not
    walk it (:func:`gc.freeze`). It changes the collector for the whole process, so it is
    the application's choice. In the reference service it cut the longest event-loop stall
    under load on PostgreSQL from 64-85 ms to 8-18 ms; see ``bastion/_startup_heap.py``.

    With ``gc_young_threshold``, start-up sets the collector's first threshold (Python's
    default: 700 allocations) to that number, for the whole process, so that young
    collections run less often. In the reference service (10,000, heap frozen) the collector's
    share of CPU fell from 11 % to 1 % at 1,000 connections (bench/README.md, finding 33).

    >>> app = FastAPI(lifespan=database_lifespan(load_settings()))  # doctest: +SKIP

    Raises:
        ValueError: ``gc_young_threshold`` is not a positive number (here, not at start-up).

    Raises (at start-up, which then aborts):
        DatabaseUnavailableError, ConfigurationError: see :meth:`Database.start`.
    """
    if gc_young_threshold is not None and gc_young_threshold < 1:
        # 0 would turn automatic collection off altogether, which is not what this asks for.
        raise ValueError(f"gc_young_threshold must be at least 1, not {gc_young_threshold}")

    @asynccontextmanager
    async def lifespan(app: ASGIApp) -> AsyncIterator[None]:
        monitor = LoopLagMonitor()
        async with Database(settings) as database:
            if migrations is not None:
                await upgrade(database, migrations)
            app.state.database = database  # type: ignore[attr-defined]
            app.state.loop_lag = monitor  # type: ignore[attr-defined]
            try:
                async with AsyncExitStack() as stack:
                    if backups is not None:
                        await stack.enter_async_context(
                            run_backups(app.state, database, backups)  # type: ignore[attr-defined]
                        )
                    if cache is not None:
                        from bastion.fastapi._cache import run_cache_and_hub  # redis: when asked

                        await stack.enter_async_context(
                            run_cache_and_hub(app.state, database, cache)  # type: ignore[attr-defined]
                        )
                    if freeze_heap:
                        freeze_startup_heap()
                    if gc_young_threshold is not None:
                        gc.set_threshold(gc_young_threshold, *gc.get_threshold()[1:])
                    # Started last: the start-up's own work (the collection above) is not lag.
                    await monitor.start()
                    yield
            finally:
                await monitor.stop()

    return lifespan
