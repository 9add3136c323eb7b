"""SELECTs, and repository writes, go straight to the driver: SQLAlchemy compiles them, Bastion
runs them.

``AsyncConnection.execute`` costs about 170 µs of CPU per point read on PostgreSQL, of which the
driver's own work (asyncpg's ``fetch``) is about 50 µs; the rest is SQLAlchemy's execution path,
paid on every statement: a greenlet spawned and switched to, an execution context built,
parameters processed, a cursor adapter, a ``CursorResult`` set up (``python -m bench.layers``;
``bench/README.md``). For a plain SELECT with nothing unusual about it, most of that work gives
the same answer every time. :class:`LeanConnection` (what :meth:`Database.read_connection
<bastion.Database.read_connection>` yields) does only what varies, about 90 µs a statement:

* **Compiled by SQLAlchemy**, from the same compiled cache and with the same cache key as
  ``execute`` uses, so a statement compiles once per process whichever path runs it.
* **Parameters** go through the compiled statement's own ``construct_params`` and bind
  processors, in its positional order. Expanding ``IN`` parameters are rendered by
  SQLAlchemy's ``_process_parameters_for_postcompile``, once per length of their lists where
  the SQL depends on nothing else (:class:`_Expansion`).
* **Planned** for a statement object run again (a module-level ``select``, a repository's
  cached statement): its SQL, where each driver argument comes from and its result metadata
  are kept from its first lean run, and the next runs skip the compiled-cache lookup and
  ``construct_params`` (:mod:`bastion._lean_plans`).
* **Run on the driver** as SQLAlchemy's adapters run it: asyncpg through the adapter's prepared
  statement cache and under its execute lock; SQLite through :mod:`bastion._sqlite_inline`
  (on the event loop within the CPU budget, else on aiosqlite's thread).
* **Rows** come back as a SQLAlchemy :class:`~sqlalchemy.engine.Result` built on the result
  metadata SQLAlchemy cached for that compiled statement (result processors, keys, and column
  objects as keys), so ``.mappings()``, ``.scalar()``, ``.scalars()``, ``row.name`` behave as
  they do on ``execute``'s result.
* **Listeners**: ``before_cursor_execute`` / ``after_cursor_execute`` are dispatched around the
  driver call, so query metrics, the slow-query log, N+1 detection and SQLite's statement
  deadline see the statement. A driver error is translated by the dialect and raised through
  SQLAlchemy's own ``Connection._handle_dbapi_exception`` (``handle_error`` listeners,
  invalidation on disconnect, the same exception classes), in a greenlet as SQLAlchemy does it.

It steps aside, and ``execute`` runs as SQLAlchemy's, for anything else: a statement that is not
a ``Select`` (DML, text, unions), several parameter sets, execution options
(on the call or the connection), echo, a schema translate map, a statement whose result metadata
SQLAlchemy has not cached yet (so its first run is always SQLAlchemy's), a connection not ready
for it, or an engine whose connection event listeners are not exactly the ones Bastion installed
(an OpenTelemetry instrumentation, or any listener of the application's, may need the cursor and
execution context this path does not build; they are counted once per unit, at its first
statement), or a connection with listeners of its own (or of the ``Connection`` class: once one
was added there, this path stays off for the process, as SQLAlchemy's flag for it stays set).

**Read units** leave SQLAlchemy's transaction unbegun where there is none on the server
(PostgreSQL's AUTOCOMMIT reads, SQLite read units, which send no BEGIN; not PgBouncer's read
units, which read in READ ONLY transactions). ``execute`` would autobegin a nominal
transaction and roll it back at close, firing ``begin`` and ``rollback`` events whose
per-connection listener collections cost about 3 % of a point read (``bench/README.md``,
finding 30). After lean statements only, ``in_transaction()`` is therefore ``False``, a read
unit's close counts no rollback in ``bastion_transactions_total``, and ``begin()`` is allowed
where ``execute``'s autobegin would have refused it. A statement that takes SQLAlchemy's path
autobegins as usual. The pool's reset on return still runs the driver's rollback.

**Writes.** A write unit's connection (:meth:`Database.write_connection
<bastion.Database.write_connection>`) is a ``LeanConnection`` too, and
:meth:`LeanConnection.returning` runs an ``INSERT``/``UPDATE``/``DELETE … RETURNING`` the same
way, inside the unit's transaction (asyncpg's ``BEGIN`` is sent before the first statement, as
the adapter's cursor sends it; on SQLite only once ``BEGIN IMMEDIATE`` has run, and a statement
runs on the event loop only once known fast, :mod:`bastion._sqlite_inline_writes`). Its result
carries the returned rows only, none of ``CursorResult``'s execution details (``rowcount``,
``inserted_primary_key``), so ``execute`` keeps SQLAlchemy's path for writes and only callers
that read nothing but the rows call ``returning``, through :func:`bastion.returning_rows`:
:class:`~bastion.Repository`'s ``create``, ``create_many`` of one row and ``update`` (and
through it ``soft_delete`` and ``restore``), and applications' own writes with ``RETURNING``. It
steps aside, in addition to the cases above, when SQLAlchemy would compute a column default in
Python before the statement (a column with a Python ``default``/``onupdate`` that the parameters
leave out), and on any read unit's connection (read units refuse writes in a ``before_execute``
listener this path does not run). Measured on the reference service's ``create_message``
in-process: see ``bench/README.md``, findings 14, 15 and 18.

SQLAlchemy internals used here (``_compile_w_cache``, ``construct_params``, ``_bind_processors``,
``_process_parameters_for_postcompile`` and the ``ExpandedState`` it returns,
``_cached_metadata``, ``_adapt_to_context``, the compiler's ``insert_prefetch`` and
``update_prefetch``, statements' ``_execution_options`` and ``_returning``, the adapters'
``_prepare`` and ``_handle_exception``, the asyncpg dialect's ``_invalidate_schema_cache`` and
its time, ``Connection._autobegin``, ``_handle_dbapi_exception`` and its transaction state)
are those of the SQLAlchemy range ``pyproject.toml`` allows; ``tests/integration/
test_lean_reads.py``, ``tests/repository/test_lean_writes.py``, ``tests/integration/
test_lean_schema_change.py`` and ``tests/integration/test_lean_plans.py`` compare this path's
results and errors with ``execute``'s, so an upgrade that changes them fails there first. (The
plans of :mod:`bastion._lean_plans` also read the compiled statement's ``positiontup``,
``binds``, ``escaped_bind_names``, ``literal_execute_params`` and ``post_compile_params``.)
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any, Final, NamedTuple, cast

from sqlalchemy import Delete, Insert, Select, Update
from sqlalchemy.engine import CursorResult
from sqlalchemy.engine.result import IteratorResult, Result
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql import compiler
from sqlalchemy.util import greenlet_spawn

from bastion._lean_plans import make_plan, plan_of
from bastion._sqlite_inline import InlineReads
from bastion._sqlite_inline_writes import InlineWrites

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Mapping, Sequence

    from sqlalchemy.engine import Connection, Dialect, Engine
    from sqlalchemy.ext.asyncio import AsyncEngine
    from sqlalchemy.sql import ClauseElement, Executable
    from sqlalchemy.sql.dml import ValuesBase

__all__ = ["LEAN_EVENTS", "LeanConnection", "lean_connection_class", "plain_connection"]

LEAN_EVENTS: Final = (
    "before_execute",
    "after_execute",
    "before_cursor_execute",
    "after_cursor_execute",
    "begin",
)
"""The connection events whose listeners the lean path must know (see the module docstring)."""


class _Invoked(NamedTuple):
    """What ``CursorResultMetaData._adapt_to_context`` reads of an execution context."""

    compiled: Any
    invoked_statement: Any


class LeanConnection(AsyncConnection):
    """An ``AsyncConnection`` whose ``execute`` runs plain SELECTs on the driver directly.

    See the module docstring for what it keeps, what it skips and when it steps aside. Use
    :func:`lean_connection_class` to get the class for an engine.
    """

    __slots__ = ("_bastion_listeners_known",)

    _bastion_listeners: tuple[int, ...] = ()
    """How many listeners of each of :data:`LEAN_EVENTS` the engine had when Bastion set it up."""

    _bastion_writes: bool = False
    """Whether this is a write unit's connection, where :meth:`returning` may run lean."""

    _bastion_autobegin: bool = True
    """Whether a lean statement begins SQLAlchemy's transaction as ``execute`` would (not on
    read units that have no transaction on the server)."""

    _bastion_commit_listeners: int = 0
    """How many ``commit`` listeners the engine had when Bastion set it up (see
    :mod:`bastion._lean_transactions`)."""

    def __init__(self, async_engine: AsyncEngine, sync_connection: Connection | None = None):
        super().__init__(async_engine, sync_connection)
        # Whether the engine's listeners are Bastion's own, checked once per unit (counting
        # them costs more than the rest of the check): a listener added while a unit runs
        # is heeded from the next unit on.
        self._bastion_listeners_known: bool | None = None

    @staticmethod
    def _bastion_ready(dbapi_connection: Any) -> bool:
        """Whether the driver connection may be used directly now (set per driver)."""
        return False

    @staticmethod
    async def _bastion_fetch(
        dialect: Dialect, dbapi_connection: Any, sql: str, parameters: Sequence[Any]
    ) -> Sequence[Any] | None:
        """Run ``sql`` on the driver and return its rows (set per driver)."""
        raise NotImplementedError

    async def execute(
        self,
        statement: Executable,
        parameters: Any = None,
        *,
        execution_options: Any = None,
    ) -> CursorResult[Any]:
        """``AsyncConnection.execute``, on the lean path when it applies.

        Raises:
            The same as ``AsyncConnection.execute`` (SQLAlchemy's exception classes).
        """
        if (
            execution_options is None
            and type(statement) is Select
            and (parameters is None or type(parameters) is dict)
        ):
            lean = await self._lean_execute(statement, parameters)
            if lean is not None:
                return cast("CursorResult[Any]", lean)
        return await super().execute(statement, parameters, execution_options=execution_options)

    async def returning(
        self, statement: ValuesBase | Update | Delete, parameters: dict[str, Any]
    ) -> Result[Any]:
        """The rows of ``statement``, an ``INSERT``/``UPDATE``/``DELETE … RETURNING``, run on
        the driver directly when the lean path applies, else through ``execute``.

        Only the rows: the result has none of ``CursorResult``'s execution details
        (``inserted_primary_key``, ``rowcount``, …), which is why ``execute`` does not take
        this path itself; Bastion's repositories, which read only the rows, call this.

        Raises:
            The same as ``AsyncConnection.execute`` (SQLAlchemy's exception classes).
        """
        # Only on a write unit's connection: a read unit refuses writes in a before_execute
        # listener, which this path does not run. One row's parameters only (a list of rows
        # is an executemany, SQLAlchemy's).
        if (
            self._bastion_writes
            and type(statement) in _WRITES
            and statement._returning
            and type(parameters) is dict
        ):
            lean = await self._lean_execute(statement, parameters)
            if lean is not None:
                return lean
        return await super().execute(statement, parameters)

    async def _lean_execute(
        self, statement: ClauseElement, parameters: dict[str, Any] | None
    ) -> IteratorResult[Any] | None:
        """The result of ``statement``, or ``None`` when the lean path does not apply."""
        sync = self.sync_connection
        if (
            sync is None
            or not plain_connection(sync)
            or sync._execution_options.keys() - _KNOWN_OPTIONS
            or statement._execution_options  # type: ignore[attr-defined]
            or not _transaction_usable(sync)
            or not self._bastion_listeners_still_known(sync)
        ):
            return None
        pooled = sync._dbapi_connection
        if pooled is None:
            return None
        dbapi_connection = pooled.dbapi_connection
        if not self._bastion_ready(dbapi_connection):
            return None
        dialect = sync.dialect
        engine = sync.engine
        compiled_cache = engine._compiled_cache
        plan = plan_of(statement, engine, compiled_cache, parameters)
        if plan is not None:
            try:
                arguments = plan.arguments(parameters)
            except Exception:
                return None  # an unprocessable parameter: execute() says which
            sql, metadata = plan.sql, plan.metadata
        else:
            prepared = _prepare(statement, engine, compiled_cache, parameters)
            if prepared is None:
                return None
            sql, arguments, metadata = prepared
        if sync._transaction is None and self._bastion_autobegin:
            # Write units (after a commit() mid-unit) and PgBouncer's read units, whose reads
            # run in driver-level READ ONLY transactions that commit() and rollback() must
            # reach. Other read units have no transaction on the server: autobegin would make a
            # nominal one, whose begin and rollback events cost a joined listener collection
            # each per unit (see "Read units" in the module docstring).
            sync._autobegin()
        # The engine's own listener collections: with no listener on the connection or its
        # class (_has_events, checked above), they are exactly what the connection's joined
        # dispatch would run, and SQLAlchemy builds that joined collection afresh for every
        # new connection.
        dispatch = sync.engine.dispatch
        dispatch.before_cursor_execute(sync, None, sql, arguments, None, False)
        try:
            rows = await self._bastion_fetch(dialect, dbapi_connection, sql, arguments)
        except BaseException as error:
            await greenlet_spawn(
                _raise_as_sqlalchemy, sync, dbapi_connection, error, sql, arguments
            )
            raise  # not reached: the call above always raises
        dispatch.after_cursor_execute(sync, None, sql, arguments, None, False)
        return IteratorResult(metadata, iter(rows or ()))

    def _bastion_listeners_still_known(self, sync: Connection) -> bool:
        """Whether the engine's listeners of :data:`LEAN_EVENTS` are still Bastion's own,
        counted once per unit (see :meth:`_listeners_unchanged`)."""
        known = self._bastion_listeners_known
        if known is None:
            known = self._bastion_listeners_known = self._listeners_unchanged(sync)
        return known

    def _bastion_control_listeners_unchanged(self, sync: Connection) -> bool:
        """Whether the engine's listeners are still Bastion's own, for a unit's BEGIN and
        COMMIT on the lean path (:mod:`bastion._lean_transactions`): those of
        :data:`LEAN_EVENTS` (``begin`` among them) and ``commit``."""
        return (
            self._bastion_listeners_still_known(sync)
            and len(sync.engine.dispatch.commit) == self._bastion_commit_listeners
        )

    def _listeners_unchanged(self, sync: Connection) -> bool:
        # A listener added to the engine or the Engine class changes the engine's counts (one
        # added to this connection itself, or to the Connection class, sets _has_events there,
        # SQLAlchemy's ConnectionEvents._listen, which _lean_execute checks per statement).
        # Counting on the engine's dispatch, which keeps its listener collections, costs a
        # tenth of counting on the connection's, which builds a joined collection per event on
        # every new connection.
        dispatch = sync.engine.dispatch
        return (
            tuple(len(getattr(dispatch, name)) for name in LEAN_EVENTS) == self._bastion_listeners
        )


_WRITES: Final = frozenset({Insert, Update, Delete})


def plain_connection(sync: Connection) -> bool:
    """Whether ``sync`` is open, valid, not echoing, and has no listener of its own or of its
    class: one the lean paths may bypass SQLAlchemy on.

    A listener on the connection or its class, even one added mid-unit, sets ``_has_events``:
    the joined dispatch would run it, the engine's collections the lean paths call would not.
    """
    return not (sync.closed or sync.invalidated or sync._echo or sync._has_events)


def _transaction_usable(sync: Connection) -> bool:
    """Whether SQLAlchemy would run a statement in ``sync``'s transaction state without a word.

    An inactive transaction or savepoint (after a failed statement or RELEASE), or a
    transaction context manager around the call, make ``execute`` check or refuse it
    (``Connection._execute_context``): those go down SQLAlchemy's path, which says why.
    """
    transaction, nested = sync._transaction, sync._nested_transaction
    return (
        (transaction is None or transaction.is_active)
        and (nested is None or nested.is_active)
        and sync._trans_context_manager is None
    )


_KNOWN_OPTIONS: Final = frozenset({"bastion_unit"})
"""Connection execution options the lean path honours as ``execute`` would (none need work)."""


def _prepare(
    statement: ClauseElement,
    engine: Engine,
    compiled_cache: Any,
    parameters: dict[str, Any] | None,
) -> tuple[str, list[Any], Any] | None:
    """The SQL, driver arguments and result metadata of ``statement`` as SQLAlchemy makes them
    (and its plan kept, where it may have one: :mod:`bastion._lean_plans`), or ``None`` when
    the lean path does not apply to it."""
    dialect = engine.dialect
    try:
        compiled, extracted, collected, _hit = statement._compile_w_cache(
            dialect=dialect,
            compiled_cache=compiled_cache,
            column_keys=sorted(parameters) if parameters else [],
            for_executemany=False,
            schema_translate_map=None,
            linting=dialect.compiler_linting | compiler.WARN_LINTING,
        )
    except Exception:
        return None  # execute() raises it, wrapped as SQLAlchemy wraps it
    metadata = compiled._cached_metadata
    if metadata is None or not compiled.positional or compiled.schema_translate_map:  # type: ignore[attr-defined]
        return None
    sql_compiled = cast("compiler.SQLCompiler", compiled)
    if sql_compiled.insert_prefetch or sql_compiled.update_prefetch:
        # Column defaults SQLAlchemy computes in Python before a write. (Its postfetch
        # columns, set by SQL expressions, only inform CursorResult.postfetch_cols().)
        return None
    try:
        values = sql_compiled.construct_params(
            parameters,
            escape_names=False,
            extracted_parameters=extracted,
            _collected_params=collected,
        )
        sql, arguments = _bind(compiled, values)
    except Exception:
        return None  # a missing or unprocessable parameter: execute() says which
    if compiled.statement is not statement:
        # The cached compiled statement was made from an equal statement object: rows must
        # also answer to this one's column objects, as execute() arranges it.
        metadata = metadata._adapt_to_context(_Invoked(compiled, statement))  # type: ignore[arg-type]
    else:
        make_plan(
            statement, compiled, extracted, collected, values, engine, compiled_cache, parameters
        )
    return sql, arguments, metadata


def _bind(compiled: Any, values: Mapping[str, Any]) -> tuple[str, list[Any]]:
    """The SQL text and positional driver arguments for ``values`` (``construct_params``'
    answer), as ``DefaultExecutionContext`` makes them."""
    if compiled.literal_execute_params or compiled.post_compile_params:
        expansion = _expansion_for(compiled, values)
        if expansion is not None:
            return expansion.sql, expansion.arguments(values)
        expanded = compiled._process_parameters_for_postcompile(values)
        processors = {**compiled._bind_processors, **expanded.processors}
        return expanded.statement, [
            processors[key](values[key]) if key in processors else values[key]
            for key in expanded.positiontup
        ]
    processors = compiled._bind_processors
    return compiled.string, [
        processors[key](values[key]) if key in processors else values[key]
        for key in compiled.positiontup
    ]


class _Expansion(NamedTuple):
    """A statement's expanding ``IN`` parameters rendered for one length of each value.

    SQLAlchemy renders them anew on every execution (``_process_parameters_for_postcompile``,
    a regular-expression substitution over the SQL and a parameter dictionary rebuilt: 16 µs
    for a page's 20 ids on SQLite, against 1.3 µs for a statement without one); the text
    depends only on how many elements each value has, so it is made once per length.
    """

    sql: str
    slots: tuple[tuple[str, bool, Any], ...]
    """Per positional argument, or per run of them: the parameter's name, whether its
    elements are spread there (an expanding parameter), and its bind processor (or ``None``)."""

    def arguments(self, values: Mapping[str, Any]) -> list[Any]:
        arguments: list[Any] = []
        for name, spread, processor in self.slots:
            value = values[name]
            if not spread:
                arguments.append(value if processor is None else processor(value))
            elif processor is None:
                arguments.extend(value)
            else:
                arguments.extend(processor(element) for element in value)
        return arguments


_MAX_EXPANSIONS: Final = 128
"""Lengths remembered per statement; lists of yet other lengths are expanded each time."""
_MAX_ELEMENTS_REMEMBERED: Final = 256
"""Longer lists are expanded each time: their SQL grows with them (a dozen characters an
element), and SQLAlchemy's own expansion costs little beside their binding."""


class _Expansions(NamedTuple):
    """A compiled statement's expanding parameters, and its expansions by their lengths."""

    names: tuple[str, ...]
    by_lengths: dict[tuple[int, ...], _Expansion]


_EXPANSIONS: Final[weakref.WeakKeyDictionary[Any, _Expansions | None]] = weakref.WeakKeyDictionary()
"""Per compiled statement (as long as SQLAlchemy keeps it): its expansions, or ``None`` for a
statement whose expansion is not a matter of lengths alone."""


def _expansion_for(compiled: Any, values: Mapping[str, Any]) -> _Expansion | None:
    """The rendering of ``compiled``'s expanding parameters for these ``values``' lengths,
    remembered; ``None`` where SQLAlchemy must render it (see :func:`_expandable_by_length`)."""
    try:
        expansions = _EXPANSIONS[compiled]
    except KeyError:
        expansions = _EXPANSIONS[compiled] = (
            _Expansions(
                tuple(compiled.bind_names[parameter] for parameter in compiled.post_compile_params),
                {},
            )
            if _expandable_by_length(compiled)
            else None
        )
    if expansions is None:
        return None
    try:
        lengths = tuple(len(values[name]) for name in expansions.names)
    except (TypeError, KeyError):  # not a sized collection: SQLAlchemy says what it makes of it
        return None
    expansion = expansions.by_lengths.get(lengths)
    if expansion is None:
        expansion = _expand(compiled, values)
        if (
            expansion is not None
            and len(expansions.by_lengths) < _MAX_EXPANSIONS
            and sum(lengths) <= _MAX_ELEMENTS_REMEMBERED
        ):
            expansions.by_lengths[lengths] = expansion
    return expansion


def _expandable_by_length(compiled: Any) -> bool:
    """Whether the SQL ``compiled``'s post-compile parameters make depends only on their
    values' lengths: every one an expanding parameter of a scalar type (no literal rendering,
    no tuples, no untyped values that could be tuples), under names that need no escaping."""
    if compiled.literal_execute_params or compiled.escaped_bind_names:
        return False
    dialect = compiled.dialect
    for parameter in compiled.post_compile_params:
        kind = parameter.type._unwrapped_dialect_impl(dialect)
        if not parameter.expanding or parameter.literal_execute:
            return False
        if kind._is_tuple_type or kind._isnull or parameter not in compiled.bind_names:
            return False
    return True


def _expand(compiled: Any, values: Mapping[str, Any]) -> _Expansion | None:
    """Have SQLAlchemy render ``compiled`` for ``values``, and read from its answer where each
    parameter goes; ``None`` if its answer is not one run of elements per expanding place."""
    expanded = compiled._process_parameters_for_postcompile(dict(values))
    processors = compiled._bind_processors
    runs = {
        tuple(keys): name for name, keys in (expanded.parameter_expansion or {}).items() if keys
    }
    order = list(expanded.positiontup or ())
    slots: list[tuple[str, bool, Any]] = []
    index = 0
    while index < len(order):
        for keys, name in runs.items():
            if tuple(order[index : index + len(keys)]) == keys:
                slots.append((name, True, processors.get(name)))
                index += len(keys)
                break
        else:
            key = order[index]
            if any(key in keys for keys in runs) or key not in values:
                return None
            slots.append((key, False, processors.get(key)))
            index += 1
    return _Expansion(expanded.statement, tuple(slots))


def _raise_as_sqlalchemy(
    sync: Connection, dbapi_connection: Any, error: BaseException, sql: str, arguments: Any
) -> None:
    """Raise ``error`` as ``execute`` would have: translated, listeners told, disconnects handled.

    A cancellation (or any other exit exception) met half-way through a driver call leaves the
    connection in an unknown state: SQLAlchemy invalidates it rather than pool it, and so does
    this. Runs inside a greenlet (invalidating a connection closes it, which may await), and
    inside an ``except`` block, where SQLAlchemy's handler finds the exception to re-raise.
    """
    try:
        if isinstance(error, Exception):
            dbapi_connection._handle_exception(error)  # raises the DBAPI-shaped error
        raise error
    except BaseException as raised:
        _forget_stale_statements(sync.dialect, raised)
        sync._handle_dbapi_exception(raised, sql, arguments, None, None)
        raise


def _forget_stale_statements(dialect: Dialect, error: BaseException) -> None:
    """After a schema change made prepared statements stale, have every connection drop its
    own before its next statement, as SQLAlchemy's asyncpg execution context does (its
    ``handle_dbapi_exception``, which needs a context this path does not build)."""
    dbapi = dialect.dbapi
    stale = tuple(
        getattr(dbapi, name)
        for name in ("InvalidCachedStatementError", "InternalServerError")
        if hasattr(dbapi, name)
    )
    if stale and isinstance(error, stale):
        dialect._invalidate_schema_cache()  # type: ignore[attr-defined]


def _asyncpg_ready(dbapi_connection: Any) -> bool:
    return True  # a closed connection fails in _prepare, and the error is raised as execute's


async def _fetch_asyncpg(
    dialect: Dialect, dbapi_connection: Any, sql: str, parameters: Sequence[Any]
) -> Sequence[Any] | None:
    """Run ``sql`` as SQLAlchemy's asyncpg cursor adapter does, without the cursor."""
    async with dbapi_connection._execute_mutex:
        if dbapi_connection._transaction is None:
            await dbapi_connection._start_transaction()
        # The dialect's time of the last schema change it heard of (as its execution context
        # passes it): a connection whose prepared statements are older drops them first.
        prepared, _attributes = await dbapi_connection._prepare(
            sql,
            dialect._invalidate_schema_cache_asof,  # type: ignore[attr-defined]
        )
        return cast("Sequence[Any]", await prepared.fetch(*parameters))


def _sqlite_ready(dbapi_connection: Any) -> bool:
    # Only connections set up to run on the loop, with nothing on their thread; a write pool's
    # only inside its unit's transaction (after BEGIN IMMEDIATE: no statement waits for a lock).
    driver = dbapi_connection._connection
    if isinstance(driver, InlineWrites):
        return driver.bastion_ready() and driver._connection.in_transaction  # type: ignore[attr-defined]
    return isinstance(driver, InlineReads) and driver.bastion_ready()


async def _fetch_sqlite(
    _dialect: Dialect, dbapi_connection: Any, sql: str, parameters: Sequence[Any]
) -> Sequence[Any] | None:
    """Run ``sql`` on an inline connection: a read on the loop within budget, else on its
    thread; in a write transaction, on the loop once known fast, else on its thread."""
    driver = dbapi_connection._connection
    cursor = driver._conn.cursor()
    rows: Sequence[Any] | None
    if isinstance(driver, InlineWrites):
        rows = await driver.bastion_write_soon(cursor, sql, tuple(parameters))
    else:
        rows = await driver.bastion_read_soon(cursor, sql, tuple(parameters))
    if driver.bastion_ready():
        cursor.close()
    # Otherwise a call of this connection is still on its thread (a cancelled unit's): the
    # pool's reset closes the cursor there, in order (bastion._sqlite's _release_snapshots).
    return rows


_DRIVERS: Final[dict[str, tuple[Callable[[Any], bool], Callable[..., Awaitable[Any]]]]] = {
    "asyncpg": (_asyncpg_ready, _fetch_asyncpg),
    "aiosqlite": (_sqlite_ready, _fetch_sqlite),
}


def lean_connection_class(
    engine: AsyncEngine, *, writes: bool = False, autobegin: bool = True
) -> type[LeanConnection] | None:
    """The :class:`LeanConnection` class for ``engine``'s read units (``writes=True``: its
    write units), or ``None`` (no lean path for its driver). ``autobegin=False``: its units
    have no transaction on the server, and lean statements begin none in SQLAlchemy either.

    Call it once every listener Bastion puts on ``engine`` is in place: the counts taken now
    are what later connections compare with.
    """
    driver = _DRIVERS.get(engine.dialect.driver)
    if driver is None:
        return None
    ready, fetch = driver
    dispatch = engine.sync_engine.dispatch
    counts = tuple(len(getattr(dispatch, name)) for name in LEAN_EVENTS)
    return type(
        "LeanConnection",
        (LeanConnection,),
        {
            "__slots__": (),
            "_bastion_listeners": counts,
            "_bastion_writes": writes,
            "_bastion_autobegin": autobegin,
            "_bastion_commit_listeners": len(dispatch.commit),
            "_bastion_ready": staticmethod(ready),
            "_bastion_fetch": staticmethod(fetch),
        },
    )
