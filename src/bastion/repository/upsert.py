"""``INSERT … ON CONFLICT DO UPDATE`` for PostgreSQL and SQLite, from one description."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import Table, and_
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.sql.dml import Insert

__all__ = ["Excluded", "excluded", "upsert_statement"]


def upsert_statement(
    dialect_name: str,
    table: Table,
    values: Mapping[str, Any],
    *,
    conflict: Sequence[str],
    set_: Mapping[str, Any],
    unless_differs: Sequence[str] = (),
) -> Insert:
    """An INSERT of ``values`` that, when ``conflict`` columns clash, applies ``set_``.

    ``set_`` maps column names to values or SQL expressions; ``excluded(name)`` values come
    from :func:`excluded`. The clashing row is only updated if it holds the same values as
    the INSERT in the ``unless_differs`` columns (an owner, say); otherwise nothing happens
    and RETURNING gives no row.

    Raises:
        ValueError: a dialect without ``ON CONFLICT`` support.
    """
    statement: Any
    if dialect_name == "postgresql":
        statement = postgresql.insert(table)
    elif dialect_name == "sqlite":
        statement = sqlite.insert(table)
    else:
        raise ValueError(f"upsert is not supported on {dialect_name}")
    statement = statement.values(dict(values))
    resolved = {
        name: (statement.excluded[value.name] if isinstance(value, Excluded) else value)
        for name, value in set_.items()
    }
    same = [table.c[name] == statement.excluded[name] for name in unless_differs]
    result: Insert = statement.on_conflict_do_update(
        index_elements=list(conflict), set_=resolved, where=and_(*same) if same else None
    )
    return result


class Excluded:
    """The value the INSERT proposed for column ``name`` (``excluded.name`` in SQL)."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name


def excluded(name: str) -> Excluded:
    """Refer to the proposed value of column ``name`` in ``set_``."""
    return Excluded(name)
