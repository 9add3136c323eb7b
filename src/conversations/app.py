"""The FastAPI application of the conversation store.

Run it with ``uvicorn conversations.app:create_app --factory`` after
``bastion db upgrade -m conversations:migrations``, or all at once with ``make demo``.
"""

from __future__ import annotations

import os
from typing import Final

from fastapi import FastAPI

from bastion import DatabaseSettings, load_settings
from bastion.backup import BackupSettings, load_backup_settings
from bastion.cache import CacheSettings, load_cache_settings
from bastion.fastapi import (
    BodySizeLimitMiddleware,
    InFlightLimitMiddleware,
    RequestContextMiddleware,
    TurnBudgetMiddleware,
    create_admin_router,
    create_health_router,
    create_metrics_router,
    database_lifespan,
    install_error_handlers,
)
from conversations import MIGRATIONS
from conversations.key_guard import DEFAULT_FAILED_KEY_RATE, KeyGuard
from conversations.routes import conversations, messages, stream

__all__ = ["MAX_BODY_BYTES", "add_request_pacing", "create_app"]

# Large enough for a 100,000-character message of 4-byte characters plus metadata and sources.
MAX_BODY_BYTES: Final = 1024 * 1024
# Young collections every 10,000 allocations instead of 700 (bench/README.md, finding 33).
GC_YOUNG_THRESHOLD: Final = 10_000
# On PostgreSQL: requests run at once; the service's statements are indexed lookups of well
# under a millisecond, so 8 keep a core busy (bench/README.md, finding 35). Not a range
# (min_in_flight): during an outage requests fail fast, the limit climbs, and the service then
# took twice as long to recover under 200 writers (finding 40).
MAX_REQUESTS_IN_FLIGHT: Final = 8


def create_app(
    settings: DatabaseSettings | None = None,
    *,
    migrate_on_start: bool = False,
    cache_settings: CacheSettings | None = None,
    backup_settings: BackupSettings | None = None,
    failed_key_rate: str | None = None,
    freeze_heap: bool = True,
    gc_young_threshold: int | None = GC_YOUNG_THRESHOLD,
) -> FastAPI:
    """Build the app. Settings default to the environment (``DATABASE_URL``, …).

    With ``migrate_on_start`` the schema is upgraded to head before the first request; with
    several workers, run ``bastion db upgrade`` once before starting them instead.
    Cache settings (``REDIS_URL``…) and backup settings (``BACKUP_DIR``…) also default to
    the environment, and so does ``failed_key_rate`` (``API_FAILED_KEY_RATE``, default
    ``"30/minute"``): how many API keys not known good one client address may present before
    it gets 429 (:mod:`conversations.key_guard`). ``freeze_heap`` and ``gc_young_threshold``
    are ``database_lifespan``'s options for the garbage collector, on by default here. On
    SQLite, requests start through :class:`~bastion.fastapi.TurnBudgetMiddleware`; on
    PostgreSQL, at most ``MAX_REQUESTS_IN_FLIGHT`` run at once
    (:class:`~bastion.fastapi.InFlightLimitMiddleware`), and one that waited
    ``DB_POOL_TIMEOUT`` for its turn is answered 503.

    Raises:
        ConfigurationError: a setting in the environment is invalid.
        ValueError: ``failed_key_rate`` is not a rate such as ``"30/minute"``.
    """
    settings = settings if settings is not None else load_settings()
    cache_settings = cache_settings if cache_settings is not None else load_cache_settings()
    backups = backup_settings if backup_settings is not None else load_backup_settings()
    app = FastAPI(
        title="Conversations (Bastion reference service)",
        version="0.1.0",
        lifespan=database_lifespan(
            settings,
            migrations=MIGRATIONS if migrate_on_start else None,
            cache=cache_settings,
            backups=backups,
            freeze_heap=freeze_heap,
            gc_young_threshold=gc_young_threshold,
        ),
    )
    if failed_key_rate is None:
        failed_key_rate = os.environ.get("API_FAILED_KEY_RATE", DEFAULT_FAILED_KEY_RATE)
    app.state.key_guard = KeyGuard(failed_key_rate)
    install_error_handlers(app)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=MAX_BODY_BYTES)
    # Added last, so it runs first: the request id covers everything below it.
    app.add_middleware(RequestContextMiddleware, n_plus_one_threshold=settings.n_plus_one_threshold)
    # Outermost, so that a waiting request has cost nothing but its parse.
    add_request_pacing(app, settings)
    # The API's own routes first: Starlette tries routes in order, and every request pays for
    # each route tried before its own (the admin router alone has a dozen).
    app.include_router(conversations.router)
    app.include_router(messages.router)
    app.include_router(stream.router)
    app.include_router(create_health_router(migrations=MIGRATIONS))
    app.include_router(create_metrics_router())
    app.include_router(create_admin_router(migrations=MIGRATIONS, backups=backups))
    return app


def add_request_pacing(app: FastAPI, settings: DatabaseSettings) -> None:
    """Add the middleware that paces the start of requests on ``settings``' backend: on
    SQLite, :class:`~bastion.fastapi.TurnBudgetMiddleware`; on PostgreSQL, at most
    ``MAX_REQUESTS_IN_FLIGHT`` at once (:class:`~bastion.fastapi.InFlightLimitMiddleware`).
    Add it last, so that it runs first. (``bench.floors`` gives its floors the same pacing.)
    """
    if settings.backend == "sqlite":
        # SQLite reads run on the loop without yielding, so under load one turn would run every
        # waiting request (bench/README.md, finding 34).
        app.add_middleware(TurnBudgetMiddleware)
    else:
        # PostgreSQL requests yield at each statement, so a turn runs a step of every request
        # in flight: fewer in flight, shorter turns (finding 35).
        # A request waits for its place no longer than for a pool connection: both are waits
        # for the database, and a backlog is answered 503 rather than served late.
        app.add_middleware(
            InFlightLimitMiddleware,
            max_in_flight=MAX_REQUESTS_IN_FLIGHT,
            max_wait_s=settings.pool_timeout_s,
        )
