"""Pages: offset pages with a total, and keyset (cursor) pages that never skip or repeat.

A keyset page resumes *after* the last row of the previous page in a total order (the sort
keys, then the primary key), so rows inserted or deleted meanwhile cannot shift it: every
row that existed when paging started is returned exactly once, and no row twice.

Cursors are opaque to clients and never trusted: :class:`CursorCodec` checks a cursor's
shape, that it was made for the same ordering, and each value's type before anything is
bound (and, given a key, its HMAC signature).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, Generic, TypeVar

from sqlalchemy import ColumnElement, RowMapping, Select, and_, bindparam, or_

from bastion.repository._invalid import InvalidQueryError

__all__ = ["CursorCodec", "CursorPage", "Keyset", "Page"]

ItemT = TypeVar("ItemT")

MAX_CURSOR_LENGTH: Final = 512
_SIGNATURE_BYTES: Final = 12


@dataclass(frozen=True, slots=True)
class Page(Generic[ItemT]):
    """One offset page and the total number of matching rows."""

    items: list[ItemT]
    total: int
    limit: int
    offset: int


@dataclass(frozen=True, slots=True)
class CursorPage(Generic[ItemT]):
    """One keyset page; ``next_cursor`` resumes after it (``None``: this was the last)."""

    items: list[ItemT]
    next_cursor: str | None


class CursorCodec:
    """Turns the sort-key values of a row into an opaque cursor, and back, checked.

    With ``key``, cursors carry an HMAC-SHA256 signature (truncated to 96 bits) and a
    cursor not made with the same key is refused.
    """

    def __init__(self, key: bytes | None = None) -> None:
        self._key = key

    def encode(self, tag: str, values: Sequence[Any]) -> str:
        """A cursor holding ``values`` for the ordering named ``tag``."""
        payload = json.dumps([tag, *map(_to_json, values)], separators=(",", ":")).encode()
        if self._key is not None:
            payload += self._sign(payload)
        return base64.urlsafe_b64encode(payload).decode().rstrip("=")

    def decode(self, cursor: str, tag: str, types: Sequence[type]) -> list[Any]:
        """The values in ``cursor``, each of the matching type in ``types``.

        Raises:
            InvalidQueryError: the cursor is malformed, too long, signed with another key,
                made for another ordering, or holds a value of the wrong type.
        """
        invalid = InvalidQueryError(
            "cursor", "invalid cursor: pass next_cursor from the previous page unchanged"
        )
        if len(cursor) > MAX_CURSOR_LENGTH or not cursor.isascii():
            raise invalid
        try:
            payload = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        except (binascii.Error, ValueError):
            raise invalid from None
        if self._key is not None:
            payload, signature = payload[:-_SIGNATURE_BYTES], payload[-_SIGNATURE_BYTES:]
            if not hmac.compare_digest(signature, self._sign(payload)):
                raise invalid
        try:
            decoded = json.loads(payload)
        except (UnicodeDecodeError, ValueError):
            raise invalid from None
        if not isinstance(decoded, list) or len(decoded) != len(types) + 1 or decoded[0] != tag:
            raise invalid
        try:
            return [_from_json(value, kind) for value, kind in zip(decoded[1:], types, strict=True)]
        except (TypeError, ValueError, OverflowError):
            raise invalid from None

    def _sign(self, payload: bytes) -> bytes:
        assert self._key is not None
        return hmac.digest(self._key, payload, hashlib.sha256)[:_SIGNATURE_BYTES]


def _to_json(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return value.hex
    return value


_INT_RANGE: Final = (-(2**63), 2**63 - 1)
_CURSOR_TYPES: Final = frozenset({bool, int, float, str, datetime, uuid.UUID})


def _from_json(value: Any, kind: type) -> Any:
    """``value`` from a cursor as ``kind``; raises ValueError/TypeError when it is not one."""
    if kind is bool or kind is int:
        if type(value) is not (bool if kind is bool else int):
            raise TypeError("wrong type in cursor")
        if kind is int and not _INT_RANGE[0] <= value <= _INT_RANGE[1]:
            raise ValueError("integer out of range in cursor")
        return value
    if kind is float:
        if type(value) not in (int, float):
            raise TypeError("wrong type in cursor")
        return float(value)
    if not isinstance(value, str) or len(value) > 256:
        raise TypeError("wrong type in cursor")
    if kind is str:
        return value
    if kind is datetime:
        parsed = datetime.fromisoformat(value)
        if parsed.tzinfo is None:
            raise ValueError("naive datetime in cursor")
        return parsed.astimezone(UTC)
    if kind is uuid.UUID:
        return uuid.UUID(hex=value)
    raise TypeError(f"cannot page by a {kind.__name__} column")


class Keyset:
    """Keyset pagination over one query shape, with its statements built once.

    ``query`` selects the rows (with its WHERE, which may use ``bindparam``s filled at
    :meth:`page`); ``order`` is a sequence of ``(column, descending)`` ending with a unique
    column, each non-nullable and present in the query's result.

    Raises:
        ValueError: the ordering is empty, a column is nullable (NULLs have no place in a
            keyset order), or of a type cursors cannot carry (JSON, say).
    """

    def __init__(
        self,
        query: Select[Any],
        order: Sequence[tuple[ColumnElement[Any], bool]],
        *,
        codec: CursorCodec | None = None,
    ) -> None:
        if not order:
            raise ValueError("a keyset needs at least one (unique) column to order by")
        for column, _ in order:
            if getattr(column, "nullable", False):
                raise ValueError(f"cannot page by the nullable column {column}")
        self._codec = codec or CursorCodec()
        self._names = [str(getattr(column, "name", column)) for column, _ in order]
        self._types: list[type] = [column.type.python_type for column, _ in order]
        for kind in self._types:
            if kind not in _CURSOR_TYPES:
                raise ValueError(f"cannot page by a column of Python type {kind.__name__}")
        spec = ",".join(
            ("-" if desc else "") + name for name, (_, desc) in zip(self._names, order, strict=True)
        )
        self._tag = hashlib.sha256(spec.encode()).hexdigest()[:6]
        ordering = [column.desc() if desc else column.asc() for column, desc in order]
        limit: Any = bindparam("_keyset_limit")
        self._first = query.order_by(*ordering).limit(limit)
        after: list[ColumnElement[bool]] = []
        for index, (column, desc) in enumerate(order):
            equal = [
                earlier == bindparam(f"_keyset_{n}", type_=earlier.type)
                for n, (earlier, _) in enumerate(order[:index])
            ]
            value = bindparam(f"_keyset_{index}", type_=column.type)
            after.append(and_(*equal, column < value if desc else column > value))
        self._after = query.where(or_(*after)).order_by(*ordering).limit(limit)

    async def page(
        self,
        executor: Any,
        params: dict[str, Any] | None = None,
        *,
        limit: int,
        cursor: str | None = None,
    ) -> CursorPage[RowMapping]:
        """The ``limit`` rows after ``cursor`` (from the start without one).

        ``executor`` is an ``AsyncConnection`` or ``AsyncSession``.

        Raises:
            InvalidQueryError: the cursor is not one this keyset made.
            ValueError: ``limit`` is not positive.
        """
        if limit < 1:
            raise ValueError("limit must be positive")
        values = dict(params or {})
        values["_keyset_limit"] = limit + 1
        statement = self._first
        if cursor is not None:
            decoded = self._codec.decode(cursor, self._tag, self._types)
            values.update({f"_keyset_{n}": value for n, value in enumerate(decoded)})
            statement = self._after
        rows = list((await executor.execute(statement, values)).mappings())
        items = rows[:limit]
        next_cursor = None
        if len(rows) > limit:
            last = items[-1]
            next_cursor = self._codec.encode(self._tag, [last[name] for name in self._names])
        return CursorPage(items=items, next_cursor=next_cursor)
