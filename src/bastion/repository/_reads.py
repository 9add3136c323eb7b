"""The reads of :class:`~bastion.repository.Repository`: rows, pages, counts, ORM loads."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

from sqlalchemy import (
    ColumnElement,
    RowMapping,
    Select,
    Table,
    bindparam,
    func,
    inspect,
    select,
)
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import selectinload
from sqlalchemy.orm.interfaces import ORMOption

from bastion.errors import NotFoundError
from bastion.repository._base import Executor, ModelT, RepositoryBase, RowState, row_id
from bastion.repository._in_list import InList
from bastion.repository.filters import Filter
from bastion.repository.pagination import CursorPage, Keyset, Page

__all__ = ["RepositoryReads"]


class RepositoryReads(RepositoryBase[ModelT]):
    """Reads; see :class:`~bastion.repository.Repository`."""

    # -- reads -----------------------------------------------------------------------------

    async def get(
        self, executor: Executor, id: Any, *, scope: Any = None, include_deleted: bool = False
    ) -> RowMapping | None:
        """The row with primary key ``id`` (in ``scope``), or ``None``."""
        state: RowState = "any" if include_deleted else "live"
        statement = self._cached(
            ("get", state),
            lambda: select(*self.columns).where(self._pk == row_id(self._pk), *self._where(state)),
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
                self._pk == row_id(self._pk), *self._where("live")
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
        state: RowState = "any" if include_deleted else "live"
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
        state: RowState = "any" if include_deleted else "live"
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
        state: RowState = "any" if include_deleted else "live"
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
        ordering = [child_key] if order_by is None else [child_key, order_by]
        return select(*child_table.c).where(InList(child_key, "parent_ids")).order_by(*ordering)

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
        state: RowState = "any" if include_deleted else "live"
        statement = (
            select(self.model)
            .where(getattr(self.model, self._pk.key).in_(list(ids)), *self._where(state))
            .options(*self.eager(*eager))
        )
        found = await session.scalars(statement, self._params(scope))
        by_id = {getattr(item, self._pk.key): item for item in found}
        return [by_id[id] for id in ids if id in by_id]
