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

from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import (
    RowMapping,
    bindparam,
    delete,
    insert,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection

from bastion.errors import NotFoundError, StaleVersionError, UniqueViolationError
from bastion.repository._base import Executor, ModelT, RowState, returning_rows, row_id
from bastion.repository._reads import RepositoryReads
from bastion.repository.audit import audit_now
from bastion.repository.upsert import excluded, upsert_statement

__all__ = ["Executor", "Repository"]


class Repository(RepositoryReads[ModelT]):
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
        return (await returning_rows(executor, statement, row)).mappings().one()

    async def create_many(
        self, executor: Executor, rows: Sequence[Mapping[str, Any]], *, scope: Any = None
    ) -> list[RowMapping]:
        """Insert ``rows`` in one batched statement (one row: a plain ``INSERT``, as
        :meth:`create` runs it); the stored rows, in input order.

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
        return list((await returning_rows(executor, statement, stamped)).mappings())

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
                column the table does not have; ``expected_version`` on a table without
                a ``version`` column.
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
            ValueError: ``expected_version`` on a table without a ``version`` column.
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
        are stamped and ``version`` goes up. A clashing row that was soft-deleted is revived
        (``deleted_at`` set to NULL): the upsert returns it as live, so every later read
        must see it too.

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
        if self._deleted is not None:
            # Revive a soft-deleted clash: otherwise the row comes back looking live while
            # every later read hides it.
            set_["deleted_at"] = None
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
        state: RowState,
        returning: tuple[str, ...] | None = None,
    ) -> RowMapping | None:
        if "deleted_at" in changes:
            self._require_soft_delete()
        if expected_version is not None and self._version is None:
            # A precondition that cannot be checked must not be skipped silently.
            raise ValueError(
                f"{self.table.name} has no version column: expected_version cannot be checked"
            )
        touch = self._touch_values()
        setting = {**changes, **touch}
        self._checked(setting)
        self._checked(increment)
        versioned = bump_version and self._version is not None
        checks_version = expected_version is not None
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
            statement = update(table).where(self._pk == row_id(self._pk), *self._where(state))
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
        return (await returning_rows(executor, statement, params)).mappings().first()

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


def _dialect_name(executor: Executor) -> str:
    if isinstance(executor, AsyncConnection):
        return executor.dialect.name
    return executor.get_bind().dialect.name
