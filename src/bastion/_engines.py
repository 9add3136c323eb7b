"""The engines behind a Database: one for writes, one for reads that the database keeps read-only.

Reads get a pool of their own whose connections the *database* refuses to write on —
PostgreSQL sessions with ``default_transaction_read_only``, SQLite connections with
``PRAGMA query_only`` — so a read unit cannot write whatever SQL it runs (it runs without a
transaction on PostgreSQL, where a write would otherwise commit at once). The read pool is
also where read replicas will plug in. An in-memory SQLite database is the exception: it
exists only inside its one connection, so reads and writes share it.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from sqlalchemy import event
from sqlalchemy.engine import URL, Dialect, ExceptionContext
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import AsyncAdaptedQueuePool

from bastion._sqlite import install_sqlite_listeners, sqlite_connect_args
from bastion.errors import ConfigurationError, DatabaseUnavailableError, StatementTimeoutError
from bastion.settings import DatabaseSettings

__all__ = ["CLIENT_TIMEOUT_GRACE_S", "Engines", "create_engines"]

CLIENT_TIMEOUT_GRACE_S: Final = 1.0
"""Seconds the client waits beyond ``DB_STATEMENT_TIMEOUT`` for the server's own cancel."""


@dataclass(frozen=True, slots=True)
class Engines:
    """The write engine and the read engine (the same object for in-memory SQLite)."""

    primary: AsyncEngine
    reader: AsyncEngine

    @property
    def all(self) -> tuple[AsyncEngine, ...]:
        """Each distinct engine once."""
        return (self.primary,) if self.reader is self.primary else (self.primary, self.reader)


def create_engines(settings: DatabaseSettings) -> Engines:
    """Create the engines ``settings`` describe (no connection is made yet).

    Raises:
        ConfigurationError: the directory of the SQLite file cannot be created.
    """
    if settings.backend == "postgresql":
        if settings.pgbouncer:
            return _create_pgbouncer_engines(settings)
        server_settings = {"application_name": settings.application_name}
        if settings.statement_timeout_s > 0:
            server_settings["statement_timeout"] = str(round(settings.statement_timeout_s * 1000))
        primary = _create(
            settings,
            connect_args=_asyncpg_connect_args(
                settings, server_settings, grace_s=CLIENT_TIMEOUT_GRACE_S
            ),
        )
        reader = _create(
            settings,
            isolation_level="AUTOCOMMIT",
            connect_args=_asyncpg_connect_args(
                settings,
                {**server_settings, "default_transaction_read_only": "on"},
                grace_s=CLIENT_TIMEOUT_GRACE_S,
            ),
        )
        return _invalidated_together(Engines(primary, reader))

    busy_timeout_ms = settings.sqlite_busy_timeout_ms
    statement_timeout_s = settings.statement_timeout_s
    if settings.is_memory:
        # Every connection to ":memory:" is a different, empty database: keep exactly one
        # and lend it to one unit at a time.
        shared = _create(
            settings,
            poolclass=AsyncAdaptedQueuePool,
            pool_size=1,
            max_overflow=0,
            pool_recycle=-1,
            connect_args=sqlite_connect_args(),
        )
        install_sqlite_listeners(
            shared.sync_engine,
            busy_timeout_ms=busy_timeout_ms,
            statement_timeout_s=statement_timeout_s,
            memory=True,
            query_only=False,
        )
        return Engines(shared, shared)

    _ensure_parent_directory(settings.url.database or "")
    primary = _create(settings, connect_args=sqlite_connect_args())
    reader = _create(settings, connect_args=sqlite_connect_args())
    for engine, query_only in ((primary, False), (reader, True)):
        install_sqlite_listeners(
            engine.sync_engine,
            busy_timeout_ms=busy_timeout_ms,
            statement_timeout_s=statement_timeout_s,
            memory=False,
            query_only=query_only,
        )
    return Engines(primary, reader)


def _create_pgbouncer_engines(settings: DatabaseSettings) -> Engines:
    """Engines for PgBouncer in transaction mode.

    PgBouncer gives each *transaction* whichever server connection is free, so: no statement
    cache (a statement prepared on one server connection is unknown to the next), a unique
    name per prepared statement (two clients' ``__asyncpg_stmt_1__`` would collide on one
    server connection), and reads inside READ ONLY transactions rather than autocommit (a
    statement's prepare and execute must reach the same server; PgBouncer also refuses the
    start-up setting the direct read pool uses). A read therefore costs BEGIN and ROLLBACK
    round trips here.
    """
    url = settings.url.update_query_dict({"prepared_statement_cache_size": "0"})
    # PgBouncer refuses a statement_timeout start-up setting: the client-side timeout is the
    # only one here, so it gets no grace period.
    connect_args = _asyncpg_connect_args(
        settings, {"application_name": settings.application_name}, grace_s=0.0
    )
    connect_args |= {
        "statement_cache_size": 0,
        "prepared_statement_name_func": _unique_statement_name,
    }
    primary = _create(settings, url=url, connect_args=connect_args)
    reader = _create(
        settings,
        url=url,
        connect_args=connect_args,
        execution_options={"postgresql_readonly": True},
    )
    return _invalidated_together(Engines(primary, reader))


def _invalidated_together(engines: Engines) -> Engines:
    """``engines``, each pool invalidated whenever the other's connection meets a disconnect.

    Both engines reach the same server: when it restarts, the connections resting in one pool
    are as dead as the one the other pool just lost. SQLAlchemy invalidates only the pool that
    met the disconnect, so the other's next unit met it again and failed: after a restart
    under write load, the first read answered 503 (``tests/faults/test_server_outages.py``,
    S1). An invalidated pool replaces, at their next checkout, the connections it made before
    (kept connections are checked the same way when lent, :mod:`bastion._warm_connections`).
    """

    def invalidate_the_other_pools(context: ExceptionContext) -> None:
        if not (context.is_disconnect and context.invalidate_pool_on_disconnect):
            return
        for engine in engines.all:
            if engine.sync_engine is not context.engine:
                # SQLAlchemy's own pool-wide invalidation, as on a disconnect; no connection
                # of this pool is at fault, so none is passed (and none is closed here).
                engine.sync_engine.pool._invalidate(None)  # type: ignore[arg-type]

    for engine in engines.all:
        event.listen(engine.sync_engine, "handle_error", invalidate_the_other_pools)
    return engines


def _asyncpg_connect_args(
    settings: DatabaseSettings, server_settings: dict[str, str], *, grace_s: float
) -> dict[str, Any]:
    """asyncpg's connect arguments: connect timeout, start-up settings, client-side timeout.

    The client-side ``command_timeout`` is the backstop for a server that cannot even answer
    its own ``statement_timeout`` (a black-holed network): ``grace_s`` later than the server's.
    """
    args: dict[str, Any] = {
        "timeout": settings.connect_timeout_s,
        "server_settings": server_settings,
    }
    if settings.statement_timeout_s > 0:
        args["command_timeout"] = settings.statement_timeout_s + grace_s
    return args


def _unique_statement_name() -> str:
    return f"__bastion_{uuid.uuid4().hex}__"


def _create(settings: DatabaseSettings, url: URL | None = None, **overrides: Any) -> AsyncEngine:
    options: dict[str, Any] = {
        "echo": settings.echo,
        # Statement parameters are user data and secrets: never in exception text or logs.
        "hide_parameters": True,
        "pool_pre_ping": settings.pool_pre_ping,
        "pool_timeout": settings.pool_timeout_s,
        "pool_size": settings.pool_size,
        "max_overflow": settings.max_overflow,
        "pool_recycle": settings.pool_recycle_s,
    }
    options.update(overrides)
    engine = create_async_engine(url if url is not None else settings.url, **options)
    event.listen(engine.sync_engine, "do_connect", _connect_or_unavailable)
    if settings.statement_timeout_s > 0:
        timeout_s = settings.statement_timeout_s

        def client_timeout_as_statement_timeout(context: ExceptionContext) -> BaseException | None:
            return _client_timeout(context, timeout_s)

        event.listen(engine.sync_engine, "handle_error", client_timeout_as_statement_timeout)
    return engine


def _client_timeout(context: ExceptionContext, timeout_s: float) -> BaseException | None:
    # asyncpg raises a bare TimeoutError when command_timeout passes. The server did not answer
    # even its own statement_timeout, so the connection cannot be trusted: discard it (and the
    # pool's older ones, as for any disconnect) and say what happened.
    if context.is_pre_ping or not isinstance(context.original_exception, TimeoutError):
        return None
    context.is_disconnect = True
    # Drop the socket now: the pool's graceful close would otherwise wait up to 2 s more for
    # a goodbye the server cannot send.
    pooled = context.connection.connection if context.connection is not None else None
    driver_connection = getattr(pooled, "driver_connection", None)
    if driver_connection is not None:
        driver_connection.terminate()
    return StatementTimeoutError(
        f"the statement did not finish within {timeout_s:g}s and the server did not answer"
    )


def _connect_or_unavailable(
    dialect: Dialect, _record: Any, cargs: tuple[Any, ...], cparams: dict[str, Any]
) -> Any:
    # Drivers raise plain OSError / TimeoutError when the server cannot be reached. Translated
    # here, where they can only mean that, rather than wherever a unit's block happens to be.
    try:
        return dialect.connect(*cargs, **cparams)
    except (OSError, TimeoutError) as exc:
        raise DatabaseUnavailableError(
            f"the database is unavailable (cannot connect: {type(exc).__name__})"
        ) from exc


def _ensure_parent_directory(database: str) -> None:
    if not database or database.startswith("file:"):
        return
    parent = Path(database).expanduser().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigurationError(
            f"DATABASE_URL: cannot create the directory {str(parent)!r} for the SQLite file "
            f"({exc.strerror})"
        ) from exc
