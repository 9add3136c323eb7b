"""Retention: the last N plus the newest per day, week and month; a pure function, no clock."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest

from bastion.backup import RetentionPolicy, select_backups_to_delete


@dataclass(frozen=True)
class Backup:
    id: str
    created_at: datetime


def _every(hours: float, count: int, start: datetime) -> list[Backup]:
    return [
        Backup(f"b{index:04d}", start - timedelta(hours=hours * index)) for index in range(count)
    ]


NOW = datetime(2026, 11, 23, 3, 0, tzinfo=UTC)


def test_parse_reads_every_key_and_defaults_missing_ones_to_zero() -> None:
    assert RetentionPolicy.parse("last=7,daily=7,weekly=4,monthly=6") == RetentionPolicy(7, 7, 4, 6)
    assert RetentionPolicy.parse(" monthly=2 , last=1 ") == RetentionPolicy(1, 0, 0, 2)
    assert str(RetentionPolicy.parse("daily=3")) == "last=0,daily=3,weekly=0,monthly=0"


@pytest.mark.parametrize("text", ["", "last=0", "last=-1", "last", "yearly=1", "last=1,last=2"])
def test_parse_refuses_what_it_cannot_honour(text: str) -> None:
    with pytest.raises(ValueError, match=r"."):
        RetentionPolicy.parse(text)


def test_last_n_keeps_the_newest_n() -> None:
    backups = _every(1, 10, NOW)
    keep, delete = select_backups_to_delete(
        backups, RetentionPolicy(last=3, daily=0, weekly=0, monthly=0)
    )
    assert [backup.id for backup in keep] == ["b0000", "b0001", "b0002"]
    assert len(delete) == 7


def test_daily_keeps_the_newest_backup_of_each_of_the_last_days() -> None:
    # Every 6 hours for 10 days: 40 backups, 4 a day.
    backups = _every(6, 40, NOW)
    keep, _ = select_backups_to_delete(
        backups, RetentionPolicy(last=1, daily=5, weekly=0, monthly=0)
    )
    days = [backup.created_at.date() for backup in keep]
    assert len(keep) == 5
    assert len(set(days)) == 5
    for kept in keep:
        same_day = [b for b in backups if b.created_at.date() == kept.created_at.date()]
        assert kept.created_at == max(b.created_at for b in same_day)


def test_weekly_and_monthly_reach_further_back_than_daily() -> None:
    backups = _every(24, 120, NOW)  # one a day for 120 days
    policy = RetentionPolicy(last=2, daily=7, weekly=4, monthly=3)
    keep, delete = select_backups_to_delete(backups, policy)
    oldest_kept = min(backup.created_at for backup in keep)
    # Monthly reaches back to the newest of the third month (November, October, September).
    assert oldest_kept == datetime(2026, 9, 30, 3, 0, tzinfo=UTC)
    assert len({b.created_at.isocalendar()[:2] for b in keep}) >= 4
    assert len(keep) + len(delete) == 120
    assert keep[0].id == "b0000"


def test_the_newest_backup_is_always_kept_and_results_are_newest_first() -> None:
    backups = list(reversed(_every(24, 5, NOW)))
    keep, delete = select_backups_to_delete(
        backups, RetentionPolicy(last=0, daily=0, weekly=0, monthly=1)
    )
    assert [b.id for b in keep] == ["b0000"]
    assert [b.id for b in delete] == ["b0001", "b0002", "b0003", "b0004"]


def test_nothing_to_prune_in_an_empty_store() -> None:
    assert select_backups_to_delete([], RetentionPolicy()) == ([], [])
