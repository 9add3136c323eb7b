"""Column types that behave the same on PostgreSQL and SQLite.

:class:`UTCDateTime` stores instants: it refuses naive datetimes (whose meaning depends on the
machine that made them), converts aware ones to UTC, and always returns aware UTC datetimes —
PostgreSQL keeps them in ``timestamptz``; SQLite, which has no time zones, keeps the UTC wall
clock, so text order is time order.

>>> from sqlalchemy.orm import Mapped, mapped_column
>>> class Event(Base):  # doctest: +SKIP
...     created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import DateTime
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator

__all__ = ["UTCDateTime", "utcnow"]


def utcnow() -> datetime:
    """The current instant as an aware UTC datetime (evaluated per call, per row)."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """An aware-UTC ``datetime`` column; naive values are rejected with ``ValueError``."""

    impl = DateTime(timezone=True)
    cache_ok = True

    @property
    def python_type(self) -> type[datetime]:
        return datetime

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(
                "naive datetime given to a UTCDateTime column; pass an aware datetime "
                "(for example bastion.utcnow())"
            )
        try:
            value = value.astimezone(UTC)
        except OverflowError:
            raise ValueError("datetime out of range once converted to UTC") from None
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def bind_processor(self, dialect: Dialect) -> Any:
        if dialect.name != "sqlite":
            return super().bind_processor(dialect)

        # The same checks and text as process_bind_param followed by SQLite's DATETIME
        # formatting ("YYYY-MM-DD HH:MM:SS.ffffff"), in one C-level isoformat call: bulk
        # inserts bind one of these per row.
        def process(value: datetime | None) -> str | None:
            if value is not None and value.tzinfo is UTC:  # the usual case, checked cheaply
                return value.replace(tzinfo=None).isoformat(sep=" ", timespec="microseconds")
            converted = self.process_bind_param(value, dialect)
            if converted is None:
                return None
            return converted.isoformat(sep=" ", timespec="microseconds")

        return process

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if not isinstance(value, datetime):
            raise TypeError(f"expected a datetime from the database, got {type(value).__name__}")
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)
