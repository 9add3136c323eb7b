"""What every part of :class:`~bastion.repository.Repository` shares: its model, columns,
whitelists, statement cache and the rules that scope and filter every statement."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any, Final, Generic, Literal, TypeVar, cast

from sqlalchemy import (
    Column,
    ColumnElement,
    Select,
    Table,
    bindparam,
    select,
)
from sqlalchemy.engine import Result
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from bastion._lean import LeanConnection
from bastion.repository._invalid import InvalidQueryError
from bastion.repository.audit import audit_now, current_actor
from bastion.repository.filters import Filter
from bastion.repository.pagination import CursorCodec
from bastion.repository.sorting import SortKey, parse_sort

__all__ = ["Executor", "ModelT", "RepositoryBase", "RowState", "returning_rows", "row_id"]

ModelT = TypeVar("ModelT")
Executor = AsyncConnection | AsyncSession
"""What a repository runs its statements on: a unit's connection or session."""


async def returning_rows(
    executor: Executor,
    statement: Any,
    parameters: Mapping[str, Any] | Sequence[Mapping[str, Any]],
) -> Result[Any]:
    """The rows of ``statement``, an ``INSERT``/``UPDATE``/``DELETE … RETURNING``, run with
    ``parameters`` (one set; for an ``INSERT``, a list of them too) in the unit of ``executor``.

    One parameter set, or a list of exactly one, runs on the driver directly where the
    connection allows it (a Bastion write unit on PostgreSQL:
    :meth:`bastion._lean.LeanConnection.returning`); anything else runs as ``execute`` runs
    it (several rows as a batched ``INSERT … RETURNING``). Give an ``INSERT`` of several rows
    ``sort_by_parameter_order=True`` when their order matters: the rows then come back in the
    order of ``parameters``.

    Raises:
        TypeError: ``parameters`` is a string or bytes, not parameter sets.
        ValueError: an empty list (there is no row to return).
        What ``execute`` raises (SQLAlchemy's exception classes; Bastion's translated ones
        when the unit ends).
    """
    if isinstance(parameters, str | bytes):
        raise TypeError("parameters must be a mapping of values, or a list of them")
    if not isinstance(parameters, Mapping):
        if not parameters:
            raise ValueError("no parameter sets: nothing to write")
        if len(parameters) == 1 and isinstance(executor, LeanConnection):
            # Only here: an ORM session reads a list as "bulk by primary key" and a dict as
            # "SET these values", so on a session the list must stay a list.
            parameters = parameters[0]
    if isinstance(parameters, Mapping):
        values = parameters if type(parameters) is dict else dict(parameters)
        if isinstance(executor, LeanConnection):
            return await executor.returning(statement, values)
        single: Result[Any] = await executor.execute(statement, values)
        return single
    several: Result[Any] = await executor.execute(statement, [dict(p) for p in parameters])
    return several


RowState = Literal["live", "deleted", "any"]
_MAX_CACHED_SHAPES: Final = 1024
_AUDIT_COLUMNS: Final = ("created_at", "updated_at", "created_by", "updated_by", "deleted_at")


class RepositoryBase(Generic[ModelT]):
    """The state of a repository and the helpers its reads and writes build on."""

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

    def _where(self, state: RowState) -> list[ColumnElement[bool]]:
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

    def _filtered(self, filters: Sequence[Filter], state: RowState) -> Select[Any]:
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


def row_id(column: Column[Any]) -> Any:
    return bindparam("_id", type_=column.type)
