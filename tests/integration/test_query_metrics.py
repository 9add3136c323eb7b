"""QueryMetrics on a real database: per-fingerprint totals, the cap on fingerprints, top()."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import text

import bastion.metrics
from bastion import Database, fingerprint
from tests.conftest import make_settings

# Four statements of different shapes, run 4, 3, 2 and 1 times.
STATEMENTS = {
    "SELECT 1 + :n AS a": 4,
    "SELECT 1 + :n AS b": 3,
    "SELECT 1 + :n AS c": 2,
    "SELECT 1 + :n AS d": 1,
}


async def test_fingerprints_past_the_cap_are_counted_as_other(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with Database(make_settings(f"sqlite:///{tmp_path / 'metrics.db'}")) as database:
        already = {stats.fingerprint for stats in database.metrics.top(limit=10_000)}
        # Room for exactly two more fingerprints: the first two statements get their own.
        monkeypatch.setattr(bastion.metrics, "MAX_FINGERPRINTS", len(already) + 2)
        async with database.read_connection() as connection:
            for statement, runs in STATEMENTS.items():
                for n in range(runs):
                    assert await connection.scalar(text(statement), {"n": n}) == 1 + n

        top = database.metrics.top(limit=10_000)
        counts = {
            stats.fingerprint: stats.count for stats in top if stats.fingerprint not in already
        }
        a, b, c, d = (fingerprint(statement) for statement in STATEMENTS)
        assert counts == {a: 4, b: 3, bastion.metrics.OTHER: 3}
        assert c not in counts
        assert d not in counts
        # Costliest first, and every figure consistent with its count.
        totals = [stats.total_s for stats in top]
        assert totals == sorted(totals, reverse=True)
        for stats in top:
            assert 0 < stats.max_s <= stats.total_s
        exported = database.metrics.registry.get_sample_value(
            "bastion_query_duration_seconds_count", {"fingerprint": bastion.metrics.OTHER}
        )
        assert exported == 3
