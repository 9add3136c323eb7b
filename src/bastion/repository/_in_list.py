"""``column IN (a list bound at execution)``, written the way each backend runs it best.

SQLAlchemy's expanding ``IN`` renders one placeholder per item into the SQL at every
execution. On PostgreSQL that costs twice: the rendering itself, and a new statement text for
every list length, which asyncpg prepares anew on each connection. ``column = ANY(:list)``
binds the whole list as one array parameter: one statement text, compiled and prepared once.
Measured on the reference service's message sources (20 parent ids, one read unit each):
520 µs per unit with ``IN``, 365 µs with ``ANY``. Other backends have no array type and keep
the expanding ``IN``.

Both forms match the same rows: an empty list matches none, and a ``NULL`` in the list
matches nothing, as in ``IN``.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import ARRAY, Boolean, ColumnElement, any_, bindparam
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.visitors import InternalTraversal, _TraverseInternalsType

__all__ = ["InList"]


class InList(ColumnElement[bool]):
    """True where ``column`` equals an item of the list bound to parameter ``name``."""

    inherit_cache = True
    # What the statement cache keys on: the column and the parameter's name.
    _traverse_internals: _TraverseInternalsType = [  # noqa: RUF012 (SQLAlchemy's declaration)
        ("column", InternalTraversal.dp_clauseelement),
        ("name", InternalTraversal.dp_string),
    ]
    type = Boolean()
    # A comparison, not a boolean column: without this, backends with no boolean type
    # (SQLite) get ``... IN (...) = 1`` in WHERE, which no index serves.
    _is_implicitly_boolean = True

    def __init__(self, column: ColumnElement[Any], name: str) -> None:
        self.column = column
        self.name = name


@compiles(InList)
def _expanding_in(element: InList, compiler: SQLCompiler, **kw: Any) -> str:
    parameter = bindparam(element.name, expanding=True, type_=element.column.type)
    return compiler.process(element.column.in_(parameter), **kw)


@compiles(InList, "postgresql")
def _equals_any(element: InList, compiler: SQLCompiler, **kw: Any) -> str:
    parameter = bindparam(element.name, type_=ARRAY(element.column.type))
    return compiler.process(element.column == any_(parameter), **kw)
