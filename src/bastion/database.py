"""``Database``: owns the engine and its sessions, and hands out units of work.

A unit of work is a block that gets an ``AsyncSession`` and either completes or leaves no
trace:

* ``db.write()`` runs in one transaction that commits when the block ends (or rolls back if it
  raises). On SQLite it takes the write lock first (``BEGIN IMMEDIATE``), so concurrent writers
  queue for up to ``busy_timeout`` instead of failing with "database is locked".
* ``db.read()`` runs without a transaction: on PostgreSQL a single SELECT costs one round
  trip — no BEGIN before it, no ROLLBACK after it. Each statement sees the data committed when
  it starts. ``db.read(consistent=True)`` gives one snapshot for several statements
  (a read-only REPEATABLE READ transaction on PostgreSQL, a deferred transaction on SQLite).

Driver errors leaving a unit are translated into :mod:`bastion.errors`; a failed COMMIT always
surfaces as an exception, never as silent success.

``db.run(db.write, work)`` runs ``work`` in a fresh unit and, when it fails with an error
that is safe to retry (``error.retryable``: a conflict, or a connection lost *before* COMMIT),
runs it again in another fresh unit: jittered exponential backoff, at most
``MAX_RETRY_ATTEMPTS`` attempts and ``RETRY_MAX_DELAY`` seconds, each retry logged and
counted. A COMMIT whose outcome is unknown is never re-run.

Every unit passes a :class:`~bastion.breaker.CircuitBreaker` first: while the database is
down, units fail at once with :class:`~bastion.errors.CircuitOpenError` instead of queueing.

>>> async def main(settings: DatabaseSettings) -> None:  # doctest: +SKIP
...     async with Database(settings) as db:
...         async with db.write() as session:
...             session.add(Item(name="first"))
...         async with db.read() as session:
...             items = (await session.scalars(select(Item))).all()
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager, nullcontext, suppress
from dataclasses import dataclass
from functools import partial
from types import TracebackType
from typing import Any, Self, TypeVar

from sqlalchemy import event, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
)
from sqlalchemy.orm import ORMExecuteState, Session
from sqlalchemy.pool import Pool, QueuePool
from sqlalchemy.util import greenlet_spawn
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential_jitter,
)

from bastion._checkout import checked_out
from bastion._engines import Engines, create_engines
from bastion._lean import lean_connection_class
from bastion._lean_transactions import begin_write, commit_write
from bastion._pool_gate import PoolGate
from bastion._sqlite import (
    READ_UNIT,
    SNAPSHOT_UNIT,
    UNIT_OPTION,
)
from bastion._sqlite_writer import WriterQueue
from bastion._to_completion import run_to_completion
from bastion._translate import translate_error
from bastion._warm_connections import WarmConnections
from bastion._warm_connections import supports as supports_warm_connections
from bastion.breaker import BreakerSnapshot, CircuitBreaker
from bastion.connection_leaks import LeakDetector
from bastion.errors import (
    BastionError,
    ConfigurationError,
    DatabaseStateError,
    DatabaseUnavailableError,
    ReadOnlyViolationError,
)
from bastion.metrics import MetricsHistory, QueryMetrics
from bastion.settings import DatabaseSettings
from bastion.urls import Backend

__all__ = ["Database", "DatabaseState", "PoolStatus"]

logger = logging.getLogger("bastion.database")

UnitT = TypeVar("UnitT")
ResultT = TypeVar("ResultT")


class DatabaseState(enum.Enum):
    """Lifecycle of a :class:`Database`: ``NEW → RUNNING → CLOSING → CLOSED``, never back."""

    NEW = "new"
    RUNNING = "running"
    CLOSING = "closing"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class PoolStatus:
    """A snapshot of the connection pool."""

    size: int
    checked_out: int
    checked_in: int
    overflow: int


class _ReadOnlySession(Session):
    """The sync session behind read units; refuses writes, which would autocommit there."""


def _refuse_write_statement(state: ORMExecuteState) -> None:
    if state.is_insert or state.is_update or state.is_delete:
        raise ReadOnlyViolationError("a read unit cannot write; use Database.write()")


def _refuse_flush(session: Session, _context: Any, _instances: Any) -> None:
    if session.new or session.dirty or session.deleted:
        raise ReadOnlyViolationError("a read unit cannot write; use Database.write()")


def _refuse_write_construct(
    _connection: Any, statement: Any, _multiparams: Any, _params: Any, _options: Any
) -> None:
    if getattr(statement, "is_dml", False):
        raise ReadOnlyViolationError("a read unit cannot write; use Database.write()")


def _begin_for_stream(
    connection: Any, _statement: Any, _multiparams: Any, _params: Any, options: Any
) -> None:
    # A read unit on PostgreSQL runs without a transaction, where asyncpg refuses the
    # server-side cursor a stream needs. Open a read-only one for it; the unit ends it.
    if options.get("stream_results") and not _driver_in_transaction(connection):
        connection.exec_driver_sql("BEGIN READ ONLY")


def _driver_in_transaction(connection: Any) -> bool:
    driver_connection = connection.connection.driver_connection
    return bool(driver_connection is not None and driver_connection.is_in_transaction())


event.listen(_ReadOnlySession, "do_orm_execute", _refuse_write_statement)
event.listen(_ReadOnlySession, "before_flush", _refuse_flush)


class Database:
    """The database of one service: an engine, its pool, and units of work on it.

    Create it with settings built at the edge, ``await start()`` it once (it connects eagerly,
    so a wrong URL or a database that is down fails here, not on the first request), and
    ``await close()`` it once. A closed Database cannot be started again.

    Raises (from ``start``):
        DatabaseStateError: ``start()`` called twice or after ``close()``.
        DatabaseUnavailableError: the first connection could not be made.
        ConfigurationError: the SQLite file's directory cannot be created.
    """

    def __init__(self, settings: DatabaseSettings) -> None:
        self.settings = settings
        self._state = DatabaseState.NEW
        self._engines: Engines | None = None
        self._read_sessions: async_sessionmaker[AsyncSession] | None = None
        self._snapshot_sessions: async_sessionmaker[AsyncSession] | None = None
        self._write_sessions: async_sessionmaker[AsyncSession] | None = None
        self._read_engine: AsyncEngine | None = None
        self._gates: dict[Pool, PoolGate] = {}
        self._lean_connections: type[AsyncConnection] | None = None
        self._lean_writes: type[AsyncConnection] | None = None
        self._warm_reads: WarmConnections | None = None
        self._warm_writes: WarmConnections | None = None
        self._reads_without_transaction = False
        self._commit_in_task = True
        # The pools that were live when close() gave up waiting: units still running then
        # return their connections to them, and those must be closed, not parked.
        self._retired_pools: tuple[Pool, ...] = ()
        self._breaker = CircuitBreaker(
            failure_threshold=settings.breaker_failure_threshold,
            reset_timeout_s=settings.breaker_reset_timeout_s,
        )
        self._retry_count = 0
        # SQLite's write units queue here, not in SQLite's busy handler: see _sqlite_writer.
        self._writers = (
            WriterQueue(settings.sqlite_busy_timeout_ms / 1000)
            if settings.backend == "sqlite" and not settings.is_memory
            else None
        )
        self.metrics = QueryMetrics(self)
        """Statement counts and latencies, errors, transactions; ``metrics.registry`` for
        Prometheus."""
        self.history = MetricsHistory(self.metrics)
        """A snapshot of the metrics every 10 s for the last hour."""
        self.leaks = LeakDetector(settings.leak_threshold_s)
        """Connections held past ``LEAK_DETECTION_THRESHOLD``, and who holds them."""
        self._monitor: asyncio.Task[None] | None = None
        # Built once and copied per retried call: a tenacity controller keeps per-run state.
        self._retrying = AsyncRetrying(
            # The first attempt runs outside tenacity (see run()), so it counts as one here.
            stop=stop_after_attempt(settings.retry_attempts)
            | stop_after_delay(settings.retry_max_delay_s),
            wait=wait_exponential_jitter(
                multiplier=settings.retry_initial_backoff_s,
                max=settings.retry_max_backoff_s,
                jitter=settings.retry_initial_backoff_s,
            ),
            retry=retry_if_exception(_is_retryable),
            before_sleep=self._log_retry,
            reraise=True,
        )

    def __repr__(self) -> str:
        return f"<Database {self.settings.display_url} {self._state.value}>"

    @property
    def state(self) -> DatabaseState:
        """Where the Database is in its lifecycle."""
        return self._state

    @property
    def backend(self) -> Backend:
        """``"postgresql"`` or ``"sqlite"``."""
        return self.settings.backend

    @property
    def engine(self) -> AsyncEngine:
        """The write engine, for what units of work do not cover (DDL, ``run_sync``).

        Raises:
            DatabaseStateError: the Database is not running.
        """
        self._require_running()
        assert self._engines is not None
        return self._engines.primary

    @property
    def breaker(self) -> BreakerSnapshot:
        """The circuit breaker's state, for health checks and metrics."""
        return self._breaker.snapshot()

    @property
    def retry_count(self) -> int:
        """How many times :meth:`run` has re-run a unit since the Database was created."""
        return self._retry_count

    @property
    def pool_capacity(self) -> int:
        """The most connections this Database's pools can hold at once.

        ``DB_POOL_SIZE + DB_MAX_OVERFLOW`` for each of the write and the read pool; one for
        an in-memory SQLite database, which lives inside its single connection.
        """
        settings = self.settings
        return 1 if settings.is_memory else 2 * (settings.pool_size + settings.max_overflow)

    @property
    def engines(self) -> tuple[AsyncEngine, ...]:
        """Every distinct engine: the write engine, then the read engine (if separate).

        Raises:
            DatabaseStateError: the Database is not running.
        """
        self._require_running()
        assert self._engines is not None
        return self._engines.all

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def start(self) -> None:
        """Create the engines and check that each can connect.

        Raises:
            DatabaseStateError: already started, or closed.
            DatabaseUnavailableError: the database cannot be reached (the message names the
                URL with its password masked, and why).
            ConfigurationError: the directory of the SQLite file cannot be created.
        """
        if self._state is not DatabaseState.NEW:
            raise DatabaseStateError(
                f"Database.start() called on a {self._state.value} Database; "
                "create a new Database instead"
            )
        self._state = DatabaseState.RUNNING
        display_url = self.settings.display_url
        try:
            self._engines = create_engines(self.settings)
            self._gates = _pool_gates(self._engines, self.settings.pool_timeout_s)
            self.metrics.install(self._engines.all)
            self.leaks.install(self._engines.all)
            self._create_sessionmakers(self._engines)
            await asyncio.wait_for(self._check_connections(), self.settings.connect_timeout_s)
        except BaseException as exc:
            await self._dispose_after_failed_start()
            if isinstance(exc, ConfigurationError):
                raise
            if isinstance(exc, TimeoutError):
                message = f"no answer within {self.settings.connect_timeout_s}s"
                raise DatabaseUnavailableError(
                    f"cannot connect to {display_url}: {message}"
                ) from exc
            translated = translate_error(exc)
            if translated is None:
                raise
            raise DatabaseUnavailableError(
                f"cannot connect to {display_url}: {translated.message}",
                sqlstate=translated.sqlstate,
            ) from exc
        if self._state is not DatabaseState.RUNNING:
            raise DatabaseStateError("the Database was closed while it was starting")
        logger.info("database started: %s", display_url)
        self._monitor = asyncio.create_task(self._watch(), name="bastion-database-monitor")
        if self.backend == "postgresql":
            await self._check_connection_budget()

    async def close(self, timeout_s: float | None = None) -> None:
        """Refuse new units, wait for running ones to return their connections, then close.

        Waits at most ``timeout_s`` (default ``DB_CLOSE_TIMEOUT``); connections still checked
        out after that are closed when their units end. Closing twice is harmless.
        """
        if self._state in (DatabaseState.CLOSING, DatabaseState.CLOSED):
            return
        if self._engines is None:
            self._state = DatabaseState.CLOSED
            return
        self._state = DatabaseState.CLOSING
        if self._monitor is not None:
            self._monitor.cancel()
            with suppress(asyncio.CancelledError):
                await self._monitor
        timeout_s = self.settings.close_timeout_s if timeout_s is None else timeout_s
        for warm in self._kept_connections():
            try:
                await warm.close()
            except Exception:
                # The pools' dispose below closes what it can; closing must go on.
                logger.warning("database close: closing a kept connection failed", exc_info=True)
        engines = self._engines.all
        pools_in_use = tuple(engine.pool for engine in engines)
        try:
            await asyncio.wait_for(self._drain(pools_in_use), timeout_s)
        except TimeoutError:
            logger.warning(
                "database close: %d connection(s) still in use after %.1fs; closing anyway",
                self.pool_status(require_running=False).checked_out,
                timeout_s,
            )
            self._retired_pools = pools_in_use
        finally:
            for engine in engines:
                await engine.dispose()
            self._state = DatabaseState.CLOSED
            logger.info("database closed: %s", self.settings.display_url)

    def pool_status(self, *, require_running: bool = True) -> PoolStatus:
        """Connections held, lent and opened beyond size, over the read and write pools."""
        if require_running:
            self._require_running()
        assert self._engines is not None
        pools: list[Any] = [engine.pool for engine in self._engines.all]
        # Connections kept warm between units are out of their pool but idle.
        warm = sum(len(kept) for kept in self._kept_connections())
        return PoolStatus(
            size=sum(pool.size() for pool in pools),
            checked_out=sum(pool.checkedout() for pool in pools) - warm,
            checked_in=sum(pool.checkedin() for pool in pools) + warm,
            overflow=sum(max(pool.overflow(), 0) for pool in pools),
        )

    @asynccontextmanager
    async def read(self, *, consistent: bool = False) -> AsyncIterator[AsyncSession]:
        """A unit that only reads. See the module docstring for its guarantees.

        Raises:
            DatabaseStateError: the Database is not running.
            ReadOnlyViolationError: the block tried to write.
            DatabaseUnavailableError, PoolTimeoutError, QueryError, …: translated driver
                errors (see :mod:`bastion.errors`).
        """
        maker = self._snapshot_sessions if consistent else self._read_sessions
        async with (
            self._unit(),
            self._gate(self._read_engine),
            # Its session checks out from the pool, where kept connections count.
            self._reserve(self._warm_reads),
        ):
            assert maker is not None
            async with maker() as session:
                try:
                    yield session
                except sa_exc.DBAPIError:
                    if self._reads_without_transaction and not consistent:
                        await session.invalidate()  # see _discard_after_driver_error
                    raise
                if session.new or session.dirty or session.deleted:
                    # Changes made in a read unit would otherwise vanish without a word.
                    raise ReadOnlyViolationError("a read unit cannot write; use Database.write()")
                if consistent:
                    await session.commit()
                elif self._reads_without_transaction:
                    await _end_stream_transaction(await session.connection())

    @asynccontextmanager
    async def read_connection(self) -> AsyncIterator[AsyncConnection]:
        """A read unit on a Core ``AsyncConnection``: the leanest way to run SELECTs.

        Same guarantees as :meth:`read` (no transaction and one round trip per statement on
        PostgreSQL; any write refused), without the ORM session: rows come back as rows, for
        routes that turn them straight into response models.
        Plain ``select()`` statements on it run on the driver directly after their first run
        (:mod:`bastion._lean`); their results are buffered ``Result`` objects.

        Raises:
            The same as :meth:`read`.
        """
        async with self._unit():
            assert self._read_engine is not None
            waited_from = time.perf_counter()
            async with (
                self._gate(self._read_engine),
                self._checkout(
                    self._read_engine, self._lean_connections, self._warm_reads
                ) as connection,
            ):
                self.metrics.observe_checkout(time.perf_counter() - waited_from)
                try:
                    yield connection
                except sa_exc.DBAPIError:
                    if self._reads_without_transaction:
                        await connection.invalidate()  # see _discard_after_driver_error
                    raise
                if self._reads_without_transaction:
                    await _end_stream_transaction(connection)

    @asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncSession]:
        """A unit that commits when the block ends, or rolls back if it raises.

        Pending ORM changes are flushed before COMMIT, so constraint errors from the block's
        own INSERTs and UPDATEs surface as :class:`~bastion.errors.IntegrityViolationError`.
        Once the block has ended, its COMMIT runs to its end even if the task is cancelled
        meanwhile: the cancellation is raised after it (on SQLite at once, as aiosqlite's
        thread finishes a COMMIT anyway). A cancellation during the block or the flush rolls
        back.

        Raises:
            asyncio.CancelledError: the task was cancelled.
            DatabaseStateError: the Database is not running.
            IntegrityViolationError: a constraint failed, at flush or at COMMIT (deferred
                constraints).
            CommitOutcomeUnknownError: the connection was lost during COMMIT.
            DatabaseUnavailableError, TransactionConflictError, …: translated driver errors.
        """
        async with self._unit(), self._write_turn():
            assert self._write_sessions is not None
            assert self._engines is not None
            async with (
                self._gate(self._engines.primary),
                # As in read(): kept write connections count inside the pool.
                self._reserve(self._warm_writes),
                self._write_sessions() as session,
            ):
                yield session
                await session.flush()
                await _commit(session, in_task=self._commit_in_task)

    @asynccontextmanager
    async def write_connection(self) -> AsyncIterator[AsyncConnection]:
        """A write unit on a Core ``AsyncConnection``: one transaction, committed at the end.

        The same guarantees as :meth:`write` — COMMIT before the block's caller goes on, and
        run to its end once begun, ROLLBACK if the block raises, errors translated — without
        the ORM unit of work, for
        routes that write with INSERT/UPDATE statements of their own.

        Raises:
            The same as :meth:`write`.
        """
        async with self._unit(), self._write_turn():
            assert self._engines is not None
            waited_from = time.perf_counter()
            async with (
                self._gate(self._engines.primary),
                self._checkout(
                    self._engines.primary, self._lean_writes, self._warm_writes
                ) as connection,
            ):
                self.metrics.observe_checkout(time.perf_counter() - waited_from)
                await begin_write(connection)
                yield connection
                await _commit(connection, in_task=self._commit_in_task)

    async def run(
        self,
        unit: Callable[[], AbstractAsyncContextManager[UnitT]],
        work: Callable[[UnitT], Awaitable[ResultT]],
    ) -> ResultT:
        """Run ``work`` in a fresh ``unit()``, re-running both while the error is retryable.

        ``unit`` is one of this Database's units — ``db.write``, ``db.write_connection``,
        ``db.read``, ``db.read_connection``, or ``functools.partial(db.read, consistent=True)``
        — and ``work`` gets its session or connection. Only the whole unit is ever re-run, so
        ``work`` must do all its writes through what it is given (and nothing outside that
        cannot be repeated). The first attempt costs nothing extra.

        >>> async def transfer(session: AsyncSession) -> None:  # doctest: +SKIP
        ...     ...
        >>> await db.run(db.write, transfer)  # doctest: +SKIP

        Raises:
            The last attempt's error (see :mod:`bastion.errors`). Among them
            :class:`~bastion.errors.CommitOutcomeUnknownError`, which is never retried: the
            write may have landed (use an idempotency key to make re-running safe).
        """
        try:
            return await _attempt(unit, work)
        except BastionError as exc:
            if not exc.retryable:
                raise
            first_failure: BastionError | None = exc
        # The first failure is handed to tenacity as its first attempt, so its backoff,
        # limits and logging apply from there on without wrapping the common, successful call.
        async for attempt in self._retrying.copy():
            with attempt:
                if first_failure is not None:
                    failure, first_failure = first_failure, None
                    raise failure
                return await _attempt(unit, work)
        raise AssertionError("unreachable: tenacity re-raises the last error")  # pragma: no cover

    # -- internals -------------------------------------------------------------------------

    async def _watch(self) -> None:
        """Scan for leaked connections every second; snapshot the metrics every interval."""
        next_snapshot = asyncio.get_running_loop().time() + self.history.interval_s
        while True:
            await asyncio.sleep(min(1.0, self.settings.leak_threshold_s / 2))
            self.leaks.scan()
            now = asyncio.get_running_loop().time()
            if now >= next_snapshot:
                next_snapshot = now + self.history.interval_s
                self.history.take(
                    pool_checked_out=self.pool_status(require_running=False).checked_out,
                    breaker=self._breaker.state.value,
                )

    def _log_retry(self, state: RetryCallState) -> None:
        self._retry_count += 1
        error = state.outcome.exception() if state.outcome is not None else None
        code = error.code if isinstance(error, BastionError) else type(error).__name__
        sleep = state.next_action.sleep if state.next_action is not None else 0.0
        logger.warning(
            "retrying a unit of work after %s (attempt %d failed; next in %.3fs)",
            code,
            state.attempt_number,
            sleep,
        )

    def _checkout(
        self,
        engine: AsyncEngine,
        connection_class: type[AsyncConnection] | None = None,
        warm: WarmConnections | None = None,
    ) -> AbstractAsyncContextManager[AsyncConnection]:
        """A connection of ``engine`` (of ``connection_class``, if given) for a unit (see
        :mod:`bastion._checkout` for SQLite's, and ``warm``'s)."""
        connect = engine.connect if connection_class is None else partial(connection_class, engine)
        if self.settings.backend == "sqlite":
            return checked_out(connect, warm)
        if warm is not None:
            return checked_out(connect, warm, close_in_task=True)
        return connect()

    def _reserve(self, warm: WarmConnections | None) -> AbstractAsyncContextManager[None]:
        """Room in the pool for a unit that checks out through it (see ``warm.reserve``)."""
        return warm.reserve() if warm is not None else nullcontext()

    def _gate(self, engine: AsyncEngine | None) -> AbstractAsyncContextManager[None]:
        """A first-come, first-served turn at ``engine``'s pool (see :mod:`bastion._pool_gate`)."""
        assert engine is not None
        gate = self._gates.get(engine.sync_engine.pool)
        return gate if gate is not None else nullcontext()

    def _write_turn(self) -> AbstractAsyncContextManager[None]:
        """This process's turn to write (SQLite files), or nothing to wait for."""
        return self._writers.turn() if self._writers is not None else nullcontext()

    @asynccontextmanager
    async def _unit(self) -> AsyncIterator[None]:
        """What every unit shares: refused unless running; errors translated on the way out.

        The session's / connection's own ``__aexit__`` (inside) closes it even if the task is
        cancelled meanwhile, so a cancelled request still returns its connection.
        """
        self._require_running()
        probe = self._breaker.admit()
        recorded = False
        try:
            yield
        except Exception as exc:
            translated = translate_error(exc)
            # An error of the application's own (translated is None) means the database
            # answered as far as the breaker is concerned.
            self._breaker.record(translated, probe=probe)
            recorded = True
            if translated is None or translated is exc:
                raise
            raise translated from exc
        except asyncio.CancelledError as cancelled:
            # A COMMIT that ran on and failed while the unit was being cancelled (_commit) is
            # how the database answered: a lost connection counts as an outage.
            if isinstance(cancelled.__cause__, BastionError):
                self._breaker.record(cancelled.__cause__, probe=probe)
                recorded = True
            raise
        else:
            self._breaker.record(None, probe=probe)
            recorded = True
        finally:
            if probe and not recorded:
                self._breaker.release()  # cancelled: let the next unit probe instead
            await self._close_retired_connections()

    async def _close_retired_connections(self) -> None:
        if self._retired_pools and self._state is DatabaseState.CLOSED:
            # Closes the connection this unit just returned (the pool only holds returned
            # ones); needs a greenlet because closing an async driver connection awaits.
            for pool in self._retired_pools:
                await greenlet_spawn(pool.dispose)

    def _require_running(self) -> None:
        if self._state is not DatabaseState.RUNNING:
            raise DatabaseStateError(f"the Database is {self._state.value}, not running")

    def _create_sessionmakers(self, engines: Engines) -> None:
        if self.settings.backend == "postgresql":
            read_engine = engines.reader  # AUTOCOMMIT, read-only sessions
            snapshot_engine = engines.reader.execution_options(
                isolation_level="REPEATABLE READ", postgresql_readonly=True
            )
        else:
            read_engine = engines.reader.execution_options(**{UNIT_OPTION: READ_UNIT})
            snapshot_engine = engines.reader.execution_options(**{UNIT_OPTION: SNAPSHOT_UNIT})
        for reading_engine in (read_engine, snapshot_engine):
            # The database refuses writes on the read pool anyway; this says so earlier and
            # more clearly, and covers in-memory SQLite, whose one pool serves both.
            event.listen(reading_engine.sync_engine, "before_execute", _refuse_write_construct)
        self._reads_without_transaction = (
            self.settings.backend == "postgresql" and not self.settings.pgbouncer
        )
        if self._reads_without_transaction:
            event.listen(read_engine.sync_engine, "before_execute", _begin_for_stream)
        self._read_engine = read_engine
        # expire_on_commit=False: attributes stay loaded after COMMIT, so code reading them
        # afterwards does not trigger implicit (and, under asyncio, failing) lazy loads.
        self._read_sessions = async_sessionmaker(
            read_engine, expire_on_commit=False, sync_session_class=_ReadOnlySession
        )
        self._snapshot_sessions = async_sessionmaker(
            snapshot_engine, expire_on_commit=False, sync_session_class=_ReadOnlySession
        )
        self._write_sessions = async_sessionmaker(engines.primary, expire_on_commit=False)
        # Last, once every listener of Bastion's is on the read engine: see bastion._lean.
        self._lean_connections = lean_connection_class(
            read_engine,
            # PgBouncer's reads run in READ ONLY transactions; the others have none to begin.
            # (Today PgBouncer's read engine carries postgresql_readonly, an execution option
            # that keeps its statements off the lean path anyway.)
            autobegin=self.settings.backend == "postgresql" and self.settings.pgbouncer,
        )
        self._lean_writes = lean_connection_class(engines.primary, writes=True)
        # aiosqlite runs a COMMIT on its connection's thread from a queue that a cancellation
        # does not empty: once queued (in _commit's first step), it runs to its end anyway,
        # and the task that _commit would otherwise start only costs the writer's turn a loop
        # iteration more (12-15 % of SQLite's create_message under load, bench/README.md).
        self._commit_in_task = engines.primary.dialect.driver != "aiosqlite"
        self._warm_reads = self._keep_connections(engines, read_engine, writes=False)
        self._warm_writes = self._keep_connections(engines, engines.primary, writes=True)

    def _keep_connections(
        self, engines: Engines, engine: AsyncEngine, *, writes: bool
    ) -> WarmConnections | None:
        """Where ``engine``'s read (or write) units keep their connections between units, if
        they may (see :mod:`bastion._warm_connections`)."""
        pool = engine.sync_engine.pool
        if (
            engines.reader is engines.primary  # in-memory SQLite: its only connection
            or not isinstance(pool, QueuePool)
            # The write engine is also db.engine, whose own users (health checks, migrations,
            # maintenance) check out past the gate: with no overflow to open more, kept
            # connections could keep them waiting.
            or (writes and self.settings.max_overflow == 0)
            # Its read units run in transactions; a kept connection would hold a client slot.
            or self.settings.pgbouncer
            # A kept connection is lent without the pool's checkout, so without its ping.
            or self.settings.pool_pre_ping
            or not supports_warm_connections(engine)
        ):
            return None
        return WarmConnections(
            engine,
            # With no overflow, one connection stays in the pool for checkouts that pass no
            # gate (an application's own engine.connect(), a health check, maintenance).
            pool.size() - (1 if self.settings.max_overflow == 0 else 0),
            writes=writes,
            on_lend=self.leaks.hold,
            on_rest=self.leaks.release,
        )

    def _kept_connections(self) -> tuple[WarmConnections, ...]:
        return tuple(kept for kept in (self._warm_reads, self._warm_writes) if kept is not None)

    async def _check_connection_budget(self) -> None:
        """Warn when every worker's pools at full size exceed the server's max_connections."""
        assert self._engines is not None
        settings = self.settings
        budget = settings.workers * self.pool_capacity
        try:
            async with self._engines.primary.connect() as connection:
                limit = int(await connection.scalar(text("SHOW max_connections")) or 0)
        except Exception:
            # Advice only: a server that will not say must not stop the service starting.
            logger.debug("could not read max_connections", exc_info=True)
            return
        if budget > limit:
            logger.warning(
                "%d worker(s) x %d pool(s) x (DB_POOL_SIZE %d + DB_MAX_OVERFLOW %d) = %d "
                "connections can exceed the server's max_connections (%d): lower the pool "
                "sizes, or put PgBouncer in front (DB_PGBOUNCER=true)",
                settings.workers,
                len(self._engines.all),
                settings.pool_size,
                settings.max_overflow,
                budget,
                limit,
            )

    async def _check_connections(self) -> None:
        assert self._engines is not None
        assert self._read_engine is not None
        for engine in (self._engines.primary, self._read_engine):
            async with engine.connect() as connection:
                await connection.exec_driver_sql("SELECT 1")

    async def _dispose_after_failed_start(self) -> None:
        self._state = DatabaseState.CLOSED
        if self._engines is not None:
            for engine in self._engines.all:
                with suppress(Exception):
                    await engine.dispose()

    @staticmethod
    async def _drain(pools: tuple[Any, ...]) -> None:
        # Polled: the pool has no awaitable "all returned" signal, and this runs once, at exit.
        while any(pool.checkedout() > 0 for pool in pools):  # noqa: ASYNC110
            await asyncio.sleep(0.05)


# Why a PostgreSQL read unit discards its connection after a driver error: it runs without a
# transaction, and asyncpg prepares a statement without ending the implicit transaction that
# opens on the server. When the execute step then fails on the client (a parameter it cannot
# encode, a refused cursor), nothing ends it: the connection would go back to the pool holding
# a transaction and a lock on the table. A write unit's ROLLBACK ends it; here nothing does.


async def _end_stream_transaction(connection: AsyncConnection) -> None:
    """End the read-only transaction a stream opened on a transaction-less read unit."""
    # Checked without a greenlet hop: this runs at the end of every PostgreSQL read unit.
    sync_connection = connection.sync_connection
    if sync_connection is None or sync_connection.invalidated or sync_connection.closed:
        return
    if _driver_in_transaction(sync_connection):
        await connection.exec_driver_sql("ROLLBACK")


def _is_retryable(exc: BaseException) -> bool:
    return isinstance(exc, BastionError) and exc.retryable


async def _attempt(
    unit: Callable[[], AbstractAsyncContextManager[UnitT]],
    work: Callable[[UnitT], Awaitable[ResultT]],
) -> ResultT:
    async with unit() as handle:
        return await work(handle)


async def _commit(unit: AsyncSession | AsyncConnection, *, in_task: bool) -> None:
    """COMMIT, run to its end even if the task is cancelled meanwhile.

    A COMMIT cut short by a cancellation loses its connection half-way (SQLAlchemy invalidates
    it) and, on PostgreSQL, asyncpg asks the server to cancel it: the work the block finished
    is rolled back, or not, depending on when the server heard. Once the block has finished,
    its COMMIT is what the caller asked for. With ``in_task``, it runs in a task of its own
    that refuses cancellation (:mod:`bastion._to_completion`), and a cancellation is raised
    once the COMMIT is over (an anyio cancel scope's, at the next await after it). Without,
    for a driver that runs a COMMIT to its end once sent (aiosqlite), the cancellation is
    raised at once.

    The COMMIT is bounded only as any statement is: by ``DB_STATEMENT_TIMEOUT`` and the client's
    grace after it. With no statement timeout (``0``) nothing bounds it: neither asyncpg nor
    Bastion sets TCP keepalive, so a COMMIT on a dead network can hold its caller for as long
    as the operating system keeps the socket (minutes, or for good if the server vanished
    after acknowledging it). An event loop shutting down cancels the COMMIT's task like any
    other.

    Raises:
        asyncio.CancelledError: the task was cancelled while the COMMIT ran (with ``in_task``,
            after it ran; a COMMIT that failed meanwhile is logged, is its ``__cause__``, and
            is told to the circuit breaker by the unit).
        CommitOutcomeUnknownError, IntegrityViolationError, …: the COMMIT failed (translated,
            marked as a failure *during* COMMIT, whose outcome may be unknown).
    """
    if not in_task:
        await _commit_translated(unit)
        return
    try:
        await run_to_completion(_commit_translated(unit), name="bastion: COMMIT")
    except asyncio.CancelledError as cancelled:
        failure = cancelled.__cause__
        if failure is not None:
            code = failure.code if isinstance(failure, BastionError) else type(failure).__name__
            # The caller hears only of its cancellation, not that its COMMIT failed.
            logger.warning("a COMMIT failed while its unit was being cancelled: %s", code)
        raise


async def _commit_translated(unit: AsyncSession | AsyncConnection) -> None:
    """COMMIT, marking a failure as one *during* COMMIT (its outcome may be unknown)."""
    try:
        await (commit_write(unit) if isinstance(unit, AsyncConnection) else unit.commit())
    except Exception as exc:
        _raise_translated(exc, during_commit=True)


def _raise_translated(exc: Exception, *, during_commit: bool = False) -> None:
    translated = translate_error(exc, during_commit=during_commit)
    if translated is None or translated is exc:
        raise exc
    raise translated from exc


def _pool_gates(engines: Engines, timeout_s: float) -> dict[Pool, PoolGate]:
    """A gate for each bounded pool of ``engines``, admitting as many units as it can lend."""
    gates: dict[Pool, PoolGate] = {}
    for engine in engines.all:
        pool = engine.sync_engine.pool
        overflow = getattr(pool, "_max_overflow", -1)  # QueuePool's; -1: no limit
        if isinstance(pool, QueuePool) and overflow >= 0:
            gates[pool] = PoolGate(pool.size() + overflow, timeout_s)
    return gates
