"""One canonical, backend-independent JSON form for every column value, and back.

The same data reads back differently from SQLite and PostgreSQL (a UUID is a ``uuid.UUID``
on one and 32 hex digits on the other; a boolean is ``True`` or ``1``; a timestamp is aware
or naive). Digests and exports encode each value through :func:`encode_value`, so equal data
gives equal bytes on every backend; imports decode through :func:`decode_value` by the
*target's* reflected column type.

=================  ==================================================================
value              canonical form
=================  ==================================================================
UUID               32 lowercase hex digits (how ``sqlalchemy.Uuid`` stores it on SQLite)
datetime           ISO-8601 in UTC with ``+00:00``; a naive value is taken as UTC
date, time         ISO-8601
Decimal            its plain decimal string, trailing zeros dropped
bytes              base64
bool               JSON ``true`` / ``false`` (SQLite's 0/1 too, when the column is BOOLEAN)
float              a JSON number; NaN and ±infinity as the strings ``"NaN"``, ``"Infinity"``
interval           seconds, a JSON number
array              a JSON array of canonical values
inet, cidr         the address or network as text; an enum: its value
JSON column        the document itself, keys sorted when the row is serialised
NULL               ``null``
=================  ==================================================================
"""

from __future__ import annotations

import base64
import datetime as dt
import enum
import ipaddress
import math
import uuid
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from typing import Any, TypeVar

from sqlalchemy import (
    JSON,
    Boolean,
    Date,
    DateTime,
    Float,
    Integer,
    LargeBinary,
    Numeric,
    String,
    Time,
    Uuid,
)
from sqlalchemy.types import TypeEngine

__all__ = ["decode_value", "encode_value", "encoder_for"]

ParsedT = TypeVar("ParsedT")

_NON_FINITE = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}

JSONValue = Any
"""What ``json.loads`` returns."""


def encode_value(value: Any, column_type: TypeEngine[Any]) -> JSONValue:
    """The canonical JSON form of ``value`` read from a column of ``column_type``.

    Raises:
        TypeError: a value of a Python type with no canonical form.
    """
    return encoder_for(column_type)(value)


def encoder_for(column_type: TypeEngine[Any]) -> Callable[[Any], JSONValue]:
    """The function giving the canonical form of values of ``column_type``.

    Chosen once per column, so encoding a row costs no type dispatch on the column.
    """
    if isinstance(column_type, JSON):
        return _as_is
    if isinstance(column_type, Boolean):
        return _encode_boolean
    return _encode_scalar


def _as_is(value: Any) -> JSONValue:
    return value


def _encode_boolean(value: Any) -> JSONValue:
    # SQLite hands back 0/1 when the driver did not convert.
    return None if value is None else bool(value)


def _encode_scalar(value: Any) -> JSONValue:
    kind = type(value)
    if value is None or kind is str or kind is int or kind is bool:
        return value
    if isinstance(value, uuid.UUID):
        return value.hex
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC).isoformat()
    if isinstance(value, dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, Decimal):
        return _decimal_text(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else _NON_FINITE[str(value)]
    if isinstance(value, int | str):  # subclasses (IntEnum, str enums)
        return int(value) if isinstance(value, int) else str(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, list | tuple):  # PostgreSQL arrays
        return [_encode_scalar(item) for item in value]
    if isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address):
        return str(value)
    if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return str(value)
    if isinstance(value, enum.Enum):
        return _encode_scalar(value.value)
    raise TypeError(f"no canonical form for a {type(value).__name__} value")


def decode_value(value: JSONValue, column_type: TypeEngine[Any], dialect_name: str) -> Any:
    """The Python value to bind for canonical ``value`` into a column of ``column_type``.

    Raises:
        ValueError: ``value`` does not fit the column (the message says what was expected).
    """
    if value is None:
        return None
    if isinstance(column_type, JSON):
        return value
    if isinstance(column_type, Boolean):
        if isinstance(value, bool) or value in (0, 1):
            return bool(value)
        raise ValueError(f"expected a boolean, got {_shown(value)}")
    if isinstance(column_type, Uuid):
        try:
            parsed = uuid.UUID(_text(value, "a UUID"))
        except ValueError:
            raise ValueError(f"expected a UUID, got {_shown(value)}") from None
        return parsed if column_type.as_uuid else parsed.hex
    if isinstance(column_type, DateTime):
        return _decode_datetime(value, column_type, dialect_name)
    if isinstance(column_type, Date):
        return _parse(dt.date.fromisoformat, value, "an ISO-8601 date")
    if isinstance(column_type, Time):
        return _parse(dt.time.fromisoformat, value, "an ISO-8601 time")
    if isinstance(column_type, LargeBinary):
        try:
            return base64.b64decode(_text(value, "base64 bytes"), validate=True)
        except ValueError:
            raise ValueError(f"expected base64 bytes, got {_shown(value)}") from None
    if isinstance(column_type, Integer):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(f"expected an integer, got {_shown(value)}")
    if isinstance(column_type, Float):
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if value in ("NaN", "Infinity", "-Infinity"):
            return float(value)
        raise ValueError(f"expected a number, got {_shown(value)}")
    if isinstance(column_type, Numeric):
        try:
            return Decimal(str(value)) if not isinstance(value, bool) else _fail(value)
        except InvalidOperation:
            raise ValueError(f"expected a decimal number, got {_shown(value)}") from None
    if isinstance(column_type, String):
        return _text(value, "text")
    return value


def _decode_datetime(value: JSONValue, column_type: DateTime, dialect_name: str) -> dt.datetime:
    parsed = _parse(dt.datetime.fromisoformat, value, "an ISO-8601 timestamp")
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)
    parsed = parsed.astimezone(dt.UTC)
    # SQLite has no time zones: it keeps the UTC wall clock, as bastion.UTCDateTime does.
    if dialect_name == "sqlite" or not column_type.timezone:
        return parsed.replace(tzinfo=None)
    return parsed


def _decimal_text(value: Decimal) -> str:
    if not value.is_finite():
        return str(value)
    text = format(value.normalize(), "f")
    return "0" if text in ("-0", "0") else text


def _parse(parse: Callable[[str], ParsedT], value: JSONValue, expected: str) -> ParsedT:
    try:
        return parse(_text(value, expected))
    except ValueError:
        raise ValueError(f"expected {expected}, got {_shown(value)}") from None


def _text(value: JSONValue, expected: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected {expected}, got {_shown(value)}")
    return value


def _fail(value: JSONValue) -> Decimal:
    raise ValueError(f"expected a decimal number, got {_shown(value)}")


def _shown(value: JSONValue) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
