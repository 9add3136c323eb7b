"""Which backups to keep: the last N, plus the newest of each recent day, week and month.

A pure function over manifests' ids and times, so it is tested with plain values and no
clock. ``BACKUP_RETENTION`` reads ``last=7,daily=7,weekly=4,monthly=6``; a missing key is 0.
A backup is kept when any rule keeps it; the newest backup is always kept.

>>> policy = RetentionPolicy.parse("last=2,daily=3")
>>> policy.last, policy.daily, policy.weekly
(2, 3, 0)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol, TypeVar

__all__ = ["RetentionPolicy", "Timestamped", "select_backups_to_delete"]

_KEYS = ("last", "daily", "weekly", "monthly")


class Timestamped(Protocol):
    """What retention needs of a backup: its id and when it was made."""

    @property
    def id(self) -> str: ...

    @property
    def created_at(self) -> datetime: ...


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    """How many backups each rule keeps."""

    last: int = 7
    daily: int = 7
    weekly: int = 4
    monthly: int = 6

    @classmethod
    def parse(cls, text: str) -> RetentionPolicy:
        """Read ``"last=7,daily=7,weekly=4,monthly=6"`` (any subset, any order).

        Raises:
            ValueError: an unknown key, a repeated key, or a count that is not an integer ≥ 0;
                or every count is 0 (that would delete every backup).
        """
        counts: dict[str, int] = {}
        for part in filter(None, (piece.strip() for piece in text.split(","))):
            key, sep, value = part.partition("=")
            key = key.strip().lower()
            if not sep or key not in _KEYS:
                raise ValueError(f"expected key=count with keys {', '.join(_KEYS)} (got {part!r})")
            if key in counts:
                raise ValueError(f"{key} is given twice")
            if not value.strip().isdigit():
                raise ValueError(f"{key} needs an integer ≥ 0 (got {value.strip()!r})")
            counts[key] = int(value)
        policy = cls(**{key: counts.get(key, 0) for key in _KEYS})
        if not any(counts.values()):
            raise ValueError("keeps no backup at all; give at least one count above 0")
        return policy

    def __str__(self) -> str:
        return ",".join(f"{key}={getattr(self, key)}" for key in _KEYS)


T = TypeVar("T", bound=Timestamped)


def select_backups_to_delete(
    backups: Sequence[T], policy: RetentionPolicy
) -> tuple[list[T], list[T]]:
    """Split ``backups`` into ``(keep, delete)``, both newest first.

    ``daily`` keeps the newest backup of each of the most recent ``daily`` days that have one
    (UTC calendar days), ``weekly`` the same per ISO week, ``monthly`` per calendar month.
    """
    ordered = sorted(backups, key=lambda backup: (backup.created_at, backup.id), reverse=True)
    kept: set[str] = {backup.id for backup in ordered[: max(policy.last, 1)]}
    rules: list[tuple[int, Callable[[datetime], tuple[int, ...]]]] = [
        (policy.daily, lambda moment: (moment.year, moment.month, moment.day)),
        (policy.weekly, lambda moment: tuple(moment.isocalendar())[:2]),
        (policy.monthly, lambda moment: (moment.year, moment.month)),
    ]
    for count, period_of in rules:
        seen: set[tuple[int, ...]] = set()
        for backup in ordered:
            if len(seen) >= count:
                break
            period = period_of(backup.created_at)
            if period not in seen:
                seen.add(period)
                kept.add(backup.id)
    keep = [backup for backup in ordered if backup.id in kept]
    delete = [backup for backup in ordered if backup.id not in kept]
    return keep, delete
