"""``Repository[Model]``: the data access every service re-writes, written once.

It works *inside* Bastion's units of work — it is handed the ``AsyncConnection`` or
``AsyncSession`` of a ``db.read_connection()`` / ``db.write_connection()`` / ``db.write()``
block and never opens or commits a transaction of its own.

* reads return Core rows (``RowMapping``) that map straight onto response models, from
  statements built once per query shape (see :mod:`bastion.repository.filters`);
  :meth:`Repository.load` gives ORM objects with explicit eager loading;
* a ``deleted_at`` column makes deletes soft: deleted rows are invisible to every read and
  count unless ``include_deleted=True``, and :meth:`~Repository.purge` removes them for good;
* a ``version`` column gives optimistic locking: :meth:`~Repository.update` with
  ``expected_version`` raises :class:`~bastion.errors.StaleVersionError` when another
  writer got there first (412 over HTTP);
* a ``scope`` column (an owner) is part of every statement, so a row of another scope is
  indistinguishable from a missing one;
* audit columns (:class:`~bastion.repository.AuditMixin`) are stamped per row at write time.

>>> notes = Repository(Note, scope="owner_id", filterable=["status"], sortable=["created_at"])
>>> async with db.write_connection() as connection:  # doctest: +SKIP
...     note = await notes.create(connection, {"text": "hi"}, scope=user_id)
...     note = await notes.update(connection, note["id"], {"text": "hello"}, scope=user_id,
...                               expected_version=note["version"])
>>> async with db.read_connection() as connection:  # doctest: +SKIP
...     page = await notes.page(connection, filters=[Eq("status", "open")], sort="-created_at",
...                             scope=user_id, limit=20)
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any, Final, Generic, Literal, TypeVar, cast

from sqlalchemy import (
    Column,
    ColumnElement,
    RowMapping,
    Select,
    Table,
    bindparam,
    delete,
    func,
    insert,
    inspect,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from sqlalchemy.orm import selectinload
from sqlalchemy.orm.interfaces import ORMOption

from bastion.errors import NotFoundError, StaleVersionError, UniqueViolationError
from bastion.repository._invalid import InvalidQueryError
from bastion.repository.audit import audit_now, current_actor
from bastion.repository.filters import Filter
from bastion.repository.pagination import CursorCodec, CursorPage, Keyset, Page
from bastion.repository.sorting import SortKey, parse_sort
from bastion.repository.upsert import excluded, upsert_statement

__all__ = ["Executor", "Repository"]

ModelT = TypeVar("ModelT")
Executor = AsyncConnection | AsyncSession
"""What a repository runs its statements on: a unit's connection or session."""

_RowState = Literal["live", "deleted", "any"]
_MAX_CACHED_SHAPES: Final = 1024
_AUDIT_COLUMNS: Final = ("created_at", "updated_at", "created_by", "updated_by", "deleted_at")


class Repository(Generic[ModelT]):
    """Typed reads and writes of one mapped model; see the module docstring.

    Args:
        model: a mapped class with a one-column primary key.
        name: the noun used in messages (``"conversation not found"``); the table name by
            default.
        scope: the column every statement is restricted to (``"owner_id"``); methods then
            need ``scope=``.
        filterable, sortable: the column names clients may filter and sort by.
        hidden: columns left out of returned rows (the scope column always is).
        cursor_key: signs keyset cursors with HMAC when given.

    Raises:
        ValueError: a composite primary key, or a named column the table does not have.
    """

    def __init__(
        self,
        model: type[ModelT],
        *,
        name: str | None = None,
        scope: str | None = None,
        filterable: Iterable[str] = (),
        sortable: Iterable[str] = (),
        hidden: Iterable[str] = (),
        cursor_key: bytes | None = None,
    ) -> None:
        self.model = model
        self.table = cast(Table, getattr(model, "__table__"))  # noqa: B009
        keys = list(self.table.primary_key.columns)
        if len(keys) != 1:
            raise ValueError(f"{self.table.name}: a repository needs a one-column primary key")
        self.name = name or self.table.name
        self._pk: Column[Any] = keys[0]
        self._scope = self._column(scope) if scope else None
        self._deleted = self.table.c.get("deleted_at")
        self._version = self.table.c.get("version")
        self.filterable: frozenset[str] = frozenset(self._checked(filterable))
        self.sortable: frozenset[str] = frozenset(self._checked(sortable))
        hide = {*self._checked(hidden), *([scope] if scope else [])}
        self.columns: list[Column[Any]] = [c for c in self.table.c if c.name not in hide]
        """The columns of every returned row."""
        self._protected = {self._pk.name, *([scope] if scope else []), "version", *_AUDIT_COLUMNS}
        self._codec = CursorCodec(cursor_key)
        self._statements: dict[Hashable, Any] = {}

    def __repr__(self) -> str:
        return f"<Repository {self.table.name}>"

    # -- reads -----------------------------------------------------------------------------

    async def get(
        self, executor: Executor, id: Any, *, scope: Any = None, include_deleted: bool = False
    ) -> RowMapping | None:
        """The row with primary key ``id`` (in ``scope``), or ``None``."""
        state: _RowState = "any" if include_deleted else "live"
        statement = self._cached(
            ("get", state),
            lambda: select(*self.columns).where(self._pk == _id(self._pk), *self._where(state)),
        )
        result = await executor.execute(statement, self._params(scope, _id=id))
        return result.mappings().first()

    async def require(
        self, executor: Executor, id: Any, *, scope: Any = None, include_deleted: bool = False
    ) -> RowMapping:
        """Like :meth:`get`.

        Raises:
            NotFoundError: no such row (or deleted, or in another scope).
        """
        row = await self.get(executor, id, scope=scope, include_deleted=include_deleted)
        if row is None:
            raise NotFoundError(f"{self.name} not found")
        return row

    async def values(
        self, executor: Executor, id: Any, *columns: str, scope: Any = None
    ) -> RowMapping | None:
        """Only ``columns`` of the visible row ``id`` (``None``: no such row): for hot paths
        that need a field or two, not the whole row.

        Raises:
            ValueError: a column the table does not have.
        """
        names = tuple(self._checked(columns))
        statement = self._cached(
            ("values", names),
            lambda: select(*(self.table.c[name] for name in names)).where(
                self._pk == _id(self._pk), *self._where("live")
            ),
        )
        result = await executor.execute(statement, self._params(scope, _id=id))
        return result.mappings().first()

    async def get_many(
        self, executor: Executor, ids: Sequence[Any], *, scope: Any = None
    ) -> list[RowMapping]:
        """The visible rows among ``ids``, in the order of ``ids`` (missing ones left out)."""
        if not ids:
            return []
        statement = self._cached(
            "get_many",
            lambda: select(*self.columns).where(
                self._pk.in_(bindparam("_ids", expanding=True, type_=self._pk.type)),
                *self._where("live"),
            ),
        )
        found = await executor.execute(statement, self._params(scope, _ids=list(ids)))
        by_id = {row[self._pk.name]: row for row in found.mappings()}
        return [by_id[id] for id in ids if id in by_id]

    async def count(
        self,
        executor: Executor,
        *,
        filters: Sequence[Filter] = (),
        scope: Any = None,
        include_deleted: bool = False,
    ) -> int:
        """How many rows match ``filters`` (deleted ones only with ``include_deleted``).

        Raises:
            InvalidQueryError: a filter on a field that is not filterable.
        """
        state: _RowState = "any" if include_deleted else "live"
        shape = self._filter_shape(filters)
        statement = self._cached(
            ("count", state, shape),
            lambda: select(func.count()).select_from(self._filtered(filters, state).subquery()),
        )
        params = self._params(scope, **self._filter_params(filters))
        return int(await executor.scalar(statement, params) or 0)

    async def page(
        self,
        executor: Executor,
        *,
        filters: Sequence[Filter] = (),
        sort: str | Sequence[str] | None = None,
        limit: int = 20,
        offset: int = 0,
        scope: Any = None,
        include_deleted: bool = False,
    ) -> Page[RowMapping]:
        """One page of matching rows in ``sort`` order, and the total that match.

        The primary key breaks ties, so rows with equal sort keys still page in one order.

        Raises:
            InvalidQueryError: a field that is not filterable or sortable.
            ValueError: ``limit`` not positive or ``offset`` negative.
        """
        if limit < 1 or offset < 0:
            raise ValueError("limit must be positive and offset not negative")
        state: _RowState = "any" if include_deleted else "live"
        keys = self._sort_keys(sort)
        shape = self._filter_shape(filters)

        def build() -> Select[Any]:
            ordering = [c.desc() if desc else c.asc() for c, desc in self._ordering(keys)]
            return (
                self._filtered(filters, state)
                .order_by(*ordering)
                .limit(bindparam("_limit"))
                .offset(bindparam("_offset"))
            )

        statement = self._cached(("list", state, shape, keys), build)
        total = await self.count(
            executor, filters=filters, scope=scope, include_deleted=include_deleted
        )
        params = self._params(scope, _limit=limit, _offset=offset, **self._filter_params(filters))
        rows = list((await executor.execute(statement, params)).mappings())
        return Page(items=rows, total=total, limit=limit, offset=offset)

    async def keyset(
        self,
        executor: Executor,
        *,
        filters: Sequence[Filter] = (),
        sort: str | Sequence[str] | None = None,
        limit: int = 20,
        cursor: str | None = None,
        scope: Any = None,
        include_deleted: bool = False,
    ) -> CursorPage[RowMapping]:
        """The ``limit`` rows after ``cursor`` in ``sort`` order (then primary key).

        Rows inserted while a client pages never make it skip or repeat a row. Sort fields
        must be non-nullable columns.

        Raises:
            InvalidQueryError: a field that is not filterable or sortable, or a cursor not
                made by this query's ordering.
        """
        state: _RowState = "any" if include_deleted else "live"
        keys = self._sort_keys(sort)
        shape = self._filter_shape(filters)
        keyset = self._cached(
            ("keyset", state, shape, keys),
            lambda: Keyset(self._filtered(filters, state), self._ordering(keys), codec=self._codec),
        )
        params = self._params(scope, **self._filter_params(filters))
        return cast(
            CursorPage[RowMapping],
            await keyset.page(executor, params, limit=limit, cursor=cursor),
        )

    def keyset_query(
        self, sort: str | Sequence[str] | None = None, *where: ColumnElement[bool]
    ) -> Keyset:
        """A :class:`Keyset` over visible rows matching ``where`` (bindparams allowed).

        For a hot route, build it once; pass :meth:`scope_params` plus your own parameters
        to :meth:`Keyset.page`.
        """
        query = select(*self.columns).where(*self._where("live"), *where)
        return Keyset(query, self._ordering(self._sort_keys(sort)), codec=self._codec)

    def scope_params(self, scope: Any) -> dict[str, Any]:
        """The parameters that bind ``scope`` into statements from :meth:`keyset_query`."""
        return self._params(scope)

    def children_query(self, relationship: str, *, order_by: Any = None) -> Select[Any]:
        """A statement loading the rows of a one-to-many ``relationship`` of many parents.

        The explicit eager load of Core reads: bind ``parent_ids`` (a list) and get every
        child row, ordered by parent and then ``order_by``. Build it once.

        Raises:
            ValueError: not a relationship of the model, or one over several columns.
        """
        known = inspect(self.model).relationships
        if relationship not in known:
            raise ValueError(f"{self.table.name} has no relationship {relationship!r}")
        pairs = known[relationship].local_remote_pairs or []
        if len(pairs) != 1:
            raise ValueError(f"{relationship} joins on several columns")
        ((_, child_key),) = pairs
        child_table = cast(Table, child_key.table)
        parents = bindparam("parent_ids", expanding=True, type_=child_key.type)
        ordering = [child_key] if order_by is None else [child_key, order_by]
        return select(*child_table.c).where(child_key.in_(parents)).order_by(*ordering)

    # -- ORM reads -------------------------------------------------------------------------

    def eager(self, *relationships: str) -> list[ORMOption]:
        """Loader options that load ``relationships`` up front (relationships are
        ``lazy="raise"``, so anything not named here fails loudly when touched).

        Raises:
            ValueError: a name that is not a relationship of the model.
        """
        known = inspect(self.model).relationships
        unknown = [name for name in relationships if name not in known]
        if unknown:
            raise ValueError(f"{self.table.name} has no relationship(s) {', '.join(unknown)}")
        return [selectinload(getattr(self.model, name)) for name in relationships]

    async def load(
        self,
        session: AsyncSession,
        id: Any,
        *,
        scope: Any = None,
        eager: Sequence[str] = (),
        include_deleted: bool = False,
    ) -> ModelT | None:
        """The ORM object with primary key ``id``, with ``eager`` relationships loaded."""
        loaded = await self.load_many(
            session, [id], scope=scope, eager=eager, include_deleted=include_deleted
        )
        return loaded[0] if loaded else None

    async def load_many(
        self,
        session: AsyncSession,
        ids: Sequence[Any],
        *,
        scope: Any = None,
        eager: Sequence[str] = (),
        include_deleted: bool = False,
    ) -> list[ModelT]:
        """The ORM objects among ``ids`` in that order, ``eager`` relationships loaded."""
        state: _RowState = "any" if include_deleted else "live"
        statement = (
            select(self.model)
            .where(getattr(self.model, self._pk.key).in_(list(ids)), *self._where(state))
            .options(*self.eager(*eager))
        )
        found = await session.scalars(statement, self._params(scope))
        by_id = {getattr(item, self._pk.key): item for item in found}
        return [by_id[id] for id in ids if id in by_id]

    # -- writes ----------------------------------------------------------------------------

    async def create(
        self, executor: Executor, values: Mapping[str, Any], *, scope: Any = None
    ) -> RowMapping:
        """Insert one row (column names → values) and return it, audit columns stamped.

        Raises:
            ValueError: a column the table does not have.
            IntegrityViolationError: a constraint failed (a missing parent is a
                ``ForeignKeyViolationError``, 422 over HTTP) — raised when the unit ends or,
                for Core connections, at once.
        """
        row = self._stamped(values, scope)
        statement = self._cached("create", lambda: insert(self.table).returning(*self.columns))
        return (await executor.execute(statement, row)).mappings().one()

    async def create_many(
        self, executor: Executor, rows: Sequence[Mapping[str, Any]], *, scope: Any = None
    ) -> list[RowMapping]:
        """Insert ``rows`` in one batched statement; the stored rows, in input order.

        Every row must name the same columns. For imports of many thousands of rows outside
        a request use :func:`bastion.bulk_insert` (COPY, batches, partial failures).

        Raises:
            ValueError: rows naming different columns, or unknown ones.
            IntegrityViolationError: a row broke a constraint (none is stored: the unit
                rolls back).
        """
        if not rows:
            return []
        stamped = [self._stamped(row, scope) for row in rows]
        if any(row.keys() != stamped[0].keys() for row in stamped):
            raise ValueError("every row must name the same columns")
        statement = self._cached(
            "create_many",
            lambda: insert(self.table).returning(*self.columns, sort_by_parameter_order=True),
        )
        return list((await executor.execute(statement, stamped)).mappings())

    async def update(
        self,
        executor: Executor,
        id: Any,
        changes: Mapping[str, Any],
        *,
        scope: Any = None,
        expected_version: int | None = None,
        increment: Mapping[str, int] | None = None,
        bump_version: bool = True,
        returning: Sequence[str] | None = None,
    ) -> RowMapping:
        """Change the visible row ``id``: set ``changes``, add ``increment``; return it.

        ``updated_at``/``updated_by`` are stamped and ``version`` goes up by one (unless
        ``bump_version=False``, for bookkeeping such as a counter that is not an edit).
        ``returning`` names the columns to return, when not all are wanted.

        Raises:
            NotFoundError: no such visible row.
            StaleVersionError: ``expected_version`` is given and the row is at another.
            ValueError: a change to the key, scope, version or audit columns, or to a
                column the table does not have.
        """
        protected = (set(changes) | set(increment or {})) & self._protected
        if protected:
            raise ValueError(f"{', '.join(sorted(protected))} cannot be changed by update()")
        row = await self._update(
            executor,
            id,
            scope=scope,
            changes=changes,
            increment=increment or {},
            bump_version=bump_version,
            expected_version=expected_version,
            state="live",
            returning=tuple(self._checked(returning)) if returning is not None else None,
        )
        if row is None:
            await self._raise_missing_or_stale(executor, id, scope, expected_version)
        assert row is not None
        return row

    async def soft_delete(
        self,
        executor: Executor,
        id: Any,
        *,
        scope: Any = None,
        expected_version: int | None = None,
    ) -> RowMapping:
        """Mark the visible row ``id`` deleted (it disappears from reads); return it.

        Raises:
            NotFoundError: no such visible row (deleting twice is a 404 the second time).
            StaleVersionError: ``expected_version`` given and the row is at another.
        """
        row = await self._update(
            executor,
            id,
            scope=scope,
            changes={"deleted_at": audit_now()},
            increment={},
            bump_version=True,
            expected_version=expected_version,
            state="live",
        )
        if row is None:
            await self._raise_missing_or_stale(executor, id, scope, expected_version)
        assert row is not None
        return row

    async def restore(self, executor: Executor, id: Any, *, scope: Any = None) -> RowMapping:
        """Bring the soft-deleted row ``id`` back; a row that is not deleted is returned
        unchanged.

        Raises:
            NotFoundError: no such row, deleted or not.
        """
        row = await self._update(
            executor,
            id,
            scope=scope,
            changes={"deleted_at": None},
            increment={},
            bump_version=True,
            expected_version=None,
            state="deleted",
        )
        if row is None:
            row = await self.require(executor, id, scope=scope, include_deleted=True)
        return row

    async def purge(
        self,
        executor: Executor,
        *,
        scope: Any = None,
        ids: Sequence[Any] | None = None,
        deleted_before: Any = None,
    ) -> int:
        """Delete soft-deleted rows for good (only those in ``ids`` / deleted before
        ``deleted_before``, when given); return how many. Live rows are never touched.
        """
        deleted = self._require_soft_delete()
        statement = delete(self.table).where(deleted.is_not(None), *self._where("any"))
        if ids is not None:
            statement = statement.where(self._pk.in_(list(ids)))
        if deleted_before is not None:
            statement = statement.where(deleted < deleted_before)
        result = await executor.execute(statement, self._params(scope))
        return int(getattr(result, "rowcount", 0) or 0)

    async def upsert(
        self,
        executor: Executor,
        values: Mapping[str, Any],
        *,
        conflict: Sequence[str] | None = None,
        update_columns: Sequence[str] | None = None,
        scope: Any = None,
    ) -> RowMapping:
        """Insert ``values``, or update the row they clash with on ``conflict`` columns
        (the primary key by default) with ``update_columns`` (every other given column).

        One statement (``INSERT … ON CONFLICT DO UPDATE``), so concurrent upserts of one key
        cannot both insert. The clashing row keeps its ``created_*`` values; ``updated_*``
        are stamped and ``version`` goes up.

        Raises:
            UniqueViolationError: the clashing row belongs to another scope (409).
            ValueError: unknown columns.
        """
        row = self._stamped(values, scope)
        keys = list(conflict or [self._pk.name])
        self._checked(keys)
        changing = (
            list(update_columns)
            if update_columns is not None
            else [name for name in values if name not in keys and name not in self._protected]
        )
        self._checked(changing)
        set_: dict[str, Any] = {name: excluded(name) for name in changing}
        set_.update(self._touch_values())
        if self._version is not None:
            set_["version"] = self._version + 1
        statement = upsert_statement(
            _dialect_name(executor),
            self.table,
            row,
            conflict=keys,
            set_=set_,
            unless_differs=[self._scope.name] if self._scope is not None else [],
        ).returning(*self.columns)
        stored = (await executor.execute(statement)).mappings().first()
        if stored is None:
            raise UniqueViolationError(f"a {self.name} with that key already exists")
        return stored

    # -- internals -------------------------------------------------------------------------

    def _column(self, name: str) -> Column[Any]:
        try:
            return self.table.c[name]
        except KeyError:
            raise ValueError(f"{self.table.name} has no column {name!r}") from None

    def _checked(self, names: Iterable[str]) -> list[str]:
        return [self._column(name).name for name in names]

    def _cached(self, key: Hashable, build: Callable[[], Any]) -> Any:
        statement = self._statements.get(key)
        if statement is None:
            statement = build()
            # Keys are made of whitelisted names, so they are few; the cap is a safeguard.
            if len(self._statements) < _MAX_CACHED_SHAPES:
                self._statements[key] = statement
        return statement

    def _params(self, scope: Any, **params: Any) -> dict[str, Any]:
        if self._scope is not None:
            if scope is None:
                raise TypeError(f"Repository of {self.table.name} needs scope=")
            params["_scope"] = scope
        return params

    def _where(self, state: _RowState) -> list[ColumnElement[bool]]:
        clauses: list[ColumnElement[bool]] = []
        if self._scope is not None:
            clauses.append(self._scope == bindparam("_scope", type_=self._scope.type))
        if self._deleted is not None and state == "live":
            clauses.append(self._deleted.is_(None))
        elif self._deleted is not None and state == "deleted":
            clauses.append(self._deleted.is_not(None))
        return clauses

    def _filter_shape(self, filters: Sequence[Filter]) -> Hashable:
        for item in filters:
            if item.field not in self.filterable:
                choices = ", ".join(sorted(self.filterable)) or "nothing"
                raise InvalidQueryError("filter", f"unknown filter field; filter by: {choices}")
        return tuple(item.shape() for item in filters)

    @staticmethod
    def _filter_params(filters: Sequence[Filter]) -> dict[str, Any]:
        params: dict[str, Any] = {}
        for n, item in enumerate(filters):
            params.update(item.params(f"_f{n}"))
        return params

    def _filtered(self, filters: Sequence[Filter], state: _RowState) -> Select[Any]:
        clauses = [
            item.clause(self.table.c[item.field], f"_f{n}") for n, item in enumerate(filters)
        ]
        return select(*self.columns).where(*self._where(state), *clauses)

    def _sort_keys(self, sort: str | Sequence[str] | None) -> tuple[SortKey, ...]:
        if sort is None:
            return ()
        return parse_sort(sort, self.sortable)

    def _ordering(self, keys: tuple[SortKey, ...]) -> list[tuple[Column[Any], bool]]:
        order = [(self.table.c[key.field], key.descending) for key in keys]
        if all(column is not self._pk for column, _ in order):
            order.append((self._pk, keys[0].descending if keys else False))
        return order

    def _stamped(self, values: Mapping[str, Any], scope: Any) -> dict[str, Any]:
        row = dict(values)
        self._checked(row)
        if self._scope is not None:
            if scope is None:
                raise TypeError(f"Repository of {self.table.name} needs scope=")
            row[self._scope.name] = scope
        now, actor = audit_now(), current_actor()
        for name, value in (
            ("created_at", now),
            ("updated_at", now),
            ("created_by", actor),
            ("updated_by", actor),
        ):
            if name in self.table.c:
                row.setdefault(name, value)
        return row

    def _touch_values(self) -> dict[str, Any]:
        values: dict[str, Any] = {}
        if "updated_at" in self.table.c:
            values["updated_at"] = audit_now()
        if "updated_by" in self.table.c:
            values["updated_by"] = current_actor()
        return values

    def _require_soft_delete(self) -> Column[Any]:
        if self._deleted is None:
            raise ValueError(f"{self.table.name} has no deleted_at column: deletes are not soft")
        return self._deleted

    async def _update(
        self,
        executor: Executor,
        id: Any,
        *,
        scope: Any,
        changes: Mapping[str, Any],
        increment: Mapping[str, int],
        bump_version: bool,
        expected_version: int | None,
        state: _RowState,
        returning: tuple[str, ...] | None = None,
    ) -> RowMapping | None:
        if "deleted_at" in changes:
            self._require_soft_delete()
        touch = self._touch_values()
        setting = {**changes, **touch}
        self._checked(setting)
        self._checked(increment)
        versioned = bump_version and self._version is not None
        checks_version = expected_version is not None and self._version is not None
        shape = (
            "update",
            returning,
            state,
            frozenset(setting),
            frozenset(increment),
            versioned,
            checks_version,
        )

        def build() -> Any:
            table = self.table
            values: dict[Any, Any] = {
                table.c[name]: bindparam(f"_set_{name}", type_=table.c[name].type)
                for name in setting
            }
            for name in increment:
                values[table.c[name]] = table.c[name] + bindparam(f"_inc_{name}")
            if versioned:
                assert self._version is not None
                values[self._version] = self._version + 1
            statement = update(table).where(self._pk == _id(self._pk), *self._where(state))
            if checks_version:
                assert self._version is not None
                statement = statement.where(self._version == bindparam("_expected_version"))
            columns = self.columns if returning is None else [table.c[n] for n in returning]
            return statement.values(values).returning(*columns)

        statement = self._cached(shape, build)
        params = self._params(scope, _id=id)
        params.update({f"_set_{name}": value for name, value in setting.items()})
        params.update({f"_inc_{name}": value for name, value in increment.items()})
        if checks_version:
            params["_expected_version"] = expected_version
        return (await executor.execute(statement, params)).mappings().first()

    async def _raise_missing_or_stale(
        self, executor: Executor, id: Any, scope: Any, expected_version: int | None
    ) -> None:
        current = await self.get(executor, id, scope=scope)
        if current is None:
            raise NotFoundError(f"{self.name} not found")
        version = current.get("version")
        raise StaleVersionError(
            f"{self.name} is at version {version}, not {expected_version}; re-read it and retry"
        )


def _id(column: Column[Any]) -> Any:
    return bindparam("_id", type_=column.type)


def _dialect_name(executor: Executor) -> str:
    if isinstance(executor, AsyncConnection):
        return executor.dialect.name
    return executor.get_bind().dialect.name
