"""Sorting by whitelisted fields: ``"-created_at"`` means newest first.

The caller's sort text is checked against the fields a repository allows before any SQL is
built, so a client cannot sort by a column it must not see (or probe one by timing).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Final

from bastion.repository._invalid import InvalidQueryError

__all__ = ["SortKey", "parse_sort"]

MAX_SORT_KEYS: Final = 4


@dataclass(frozen=True, slots=True)
class SortKey:
    """One field to sort by, and its direction."""

    field: str
    descending: bool = False

    def __str__(self) -> str:
        return f"-{self.field}" if self.descending else self.field


def parse_sort(spec: str | Sequence[str], allowed: Collection[str]) -> tuple[SortKey, ...]:
    """The sort keys in ``spec`` (``"-updated_at,title"`` or a list of such parts).

    Raises:
        InvalidQueryError: a field not in ``allowed``, one named twice, an empty part, or
            more than four keys. The message lists the allowed fields, never the input.
    """
    parts = spec.split(",") if isinstance(spec, str) else list(spec)
    if not parts or len(parts) > MAX_SORT_KEYS:
        raise InvalidQueryError("sort", f"sort by 1 to {MAX_SORT_KEYS} fields")
    keys: list[SortKey] = []
    for part in parts:
        part = part.strip()
        field = part.removeprefix("-")
        if field not in allowed:
            choices = ", ".join(sorted(allowed)) or "nothing"
            raise InvalidQueryError(
                "sort", f"unknown sort field; sort by one of: {choices} (prefix - for descending)"
            )
        if any(key.field == field for key in keys):
            raise InvalidQueryError("sort", "a field may appear only once in sort")
        keys.append(SortKey(field, descending=part.startswith("-")))
    return tuple(keys)
