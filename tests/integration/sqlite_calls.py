"""Where an SQLite connection's calls ran: the count aiosqlite's thread was handed."""

from __future__ import annotations

import time
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncConnection

import bastion._sqlite_inline_writes


async def thread_calls(connection: AsyncConnection) -> int:
    """Calls this connection has sent to aiosqlite's thread so far (see bastion._sqlite_inline)."""
    raw = await connection.get_raw_connection()
    return int(raw.driver_connection._bastion_queued)


class SlowCommitClock:
    """The clock :mod:`bastion._sqlite_inline_writes` times COMMITs with, ``step`` seconds
    later at each reading while ``slow``: a COMMIT then looks to have taken ``step`` seconds,
    as on a slow disk."""

    def __init__(self, step: float) -> None:
        self.step = step
        self.slow = False
        self._added = 0.0

    def perf_counter(self) -> float:
        if self.slow:
            self._added += self.step
        return time.perf_counter() + self._added

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def slow_commits(monkeypatch: pytest.MonkeyPatch, *, slow: bool = False) -> SlowCommitClock:
    """Time SQLite COMMITs with a :class:`SlowCommitClock` of 3 ms steps (over the 2 ms
    inline budget) for the rest of the test; ``slow`` makes them slow from the start."""
    clock = SlowCommitClock(step=0.003)
    clock.slow = slow
    monkeypatch.setattr(bastion._sqlite_inline_writes, "time", clock)
    return clock
