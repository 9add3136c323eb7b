"""A disconnect met by one engine invalidates the other engine's pool too (bastion._engines).

The write and read engines reach the same server. After it restarts, the first unit on either
engine meets a dead connection; the other engine's resting connections are dead as well, and
its next unit must not have to find that out for itself (before, the first read after a
restart under write load answered 503). Runs against the throwaway server.
"""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import text

from bastion import BastionError, Database
from tests.faults.stack import FaultStack


@pytest.mark.parametrize("first", ["write", "read"])
async def test_after_a_restart_only_the_first_unit_meets_a_dead_connection(
    fault_stack: FaultStack, first: str
) -> None:
    async with Database(fault_stack.settings(DB_POOL_SIZE=4, DB_MAX_OVERFLOW=4)) as database:
        units = {"write": database.write_connection, "read": database.read_connection}
        second = "read" if first == "write" else "write"
        # Several connections resting in each pool (kept and pooled), made before the restart.
        for _ in range(2):
            await asyncio.gather(*(_select_one(units[kind]) for kind in units for _ in range(3)))
        await asyncio.to_thread(fault_stack.server.restart, "fast")

        with pytest.raises(BastionError) as raised:
            await _select_one(units[first])
        assert raised.value.retryable  # a lost connection: the unit may run again
        # The other engine's pool was invalidated with it: its resting connections are
        # replaced at their next checkout, and no unit of it fails.
        assert await asyncio.gather(*(_select_one(units[second]) for _ in range(3))) == [1] * 3
        assert await asyncio.gather(*(_select_one(units[first]) for _ in range(3))) == [1] * 3


async def _select_one(unit: object) -> int:
    async with unit() as connection:  # type: ignore[operator]
        return int(await connection.scalar(text("SELECT 1")))
