"""Typed filters: equality, membership, ranges, null checks and text search.

A filter names a field; the :class:`~bastion.repository.Repository` checks the name against
its whitelist and turns the filter into a WHERE clause over bound parameters — values never
become SQL text, and a query of the same *shape* (the same filters with other values) reuses
one statement. Text search matches literally: ``%``, ``_`` and ``\\`` in the search text
are escaped, not wildcards.

>>> filters = [Eq("status", "active"), Range("created_at", ge=monday), Search("title", "50%")]
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from sqlalchemy import ColumnElement, String, and_, bindparam, true

__all__ = ["Eq", "Filter", "In", "IsNull", "Range", "Search", "escape_like"]

LIKE_ESCAPE: Final = "\\"
_BOUNDS: Final = ("gt", "ge", "lt", "le")


def escape_like(text: str) -> str:
    """``text`` with LIKE's wildcards and escape character escaped (with ``\\``)."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


@dataclass(frozen=True, slots=True)
class Eq:
    """``field = value``."""

    field: str
    value: Any

    def shape(self) -> Hashable:
        return ("eq", self.field)

    def clause(self, column: ColumnElement[Any], name: str) -> ColumnElement[bool]:
        return column == bindparam(name, type_=column.type)

    def params(self, name: str) -> dict[str, Any]:
        return {name: self.value}


@dataclass(frozen=True, slots=True)
class In:
    """``field IN values``; an empty ``values`` matches nothing."""

    field: str
    values: Sequence[Any]

    def shape(self) -> Hashable:
        return ("in", self.field)

    def clause(self, column: ColumnElement[Any], name: str) -> ColumnElement[bool]:
        return column.in_(bindparam(name, expanding=True, type_=column.type))

    def params(self, name: str) -> dict[str, Any]:
        return {name: list(self.values)}


@dataclass(frozen=True, slots=True)
class Range:
    """Bounds on ``field``: any of ``gt``, ``ge``, ``lt``, ``le`` (``None``: unbounded)."""

    field: str
    gt: Any = None
    ge: Any = None
    lt: Any = None
    le: Any = None

    def shape(self) -> Hashable:
        return ("range", self.field, *(getattr(self, b) is not None for b in _BOUNDS))

    def clause(self, column: ColumnElement[Any], name: str) -> ColumnElement[bool]:
        def bound(suffix: str) -> Any:
            return bindparam(f"{name}_{suffix}", type_=column.type)

        clauses: list[ColumnElement[bool]] = []
        if self.gt is not None:
            clauses.append(column > bound("gt"))
        if self.ge is not None:
            clauses.append(column >= bound("ge"))
        if self.lt is not None:
            clauses.append(column < bound("lt"))
        if self.le is not None:
            clauses.append(column <= bound("le"))
        return and_(true(), *clauses)

    def params(self, name: str) -> dict[str, Any]:
        return {f"{name}_{b}": getattr(self, b) for b in _BOUNDS if getattr(self, b) is not None}


@dataclass(frozen=True, slots=True)
class IsNull:
    """``field IS NULL`` (or ``IS NOT NULL`` with ``null=False``)."""

    field: str
    null: bool = True

    def shape(self) -> Hashable:
        return ("null", self.field, self.null)

    def clause(self, column: ColumnElement[Any], name: str) -> ColumnElement[bool]:
        return column.is_(None) if self.null else column.is_not(None)

    def params(self, name: str) -> dict[str, Any]:
        return {}


@dataclass(frozen=True, slots=True)
class Search:
    """``field`` contains ``text``, ignoring case (ASCII case on SQLite), wildcards literal."""

    field: str
    text: str

    def shape(self) -> Hashable:
        return ("search", self.field)

    def clause(self, column: ColumnElement[Any], name: str) -> ColumnElement[bool]:
        return column.ilike(bindparam(name, type_=String()), escape=LIKE_ESCAPE)

    def params(self, name: str) -> dict[str, Any]:
        return {name: f"%{escape_like(self.text)}%"}


Filter = Eq | In | Range | IsNull | Search
"""Any of the filters above."""
