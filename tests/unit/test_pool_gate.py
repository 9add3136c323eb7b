"""PoolGate: turns in arrival order, a timeout that says why, a cancelled waiter passes its turn."""

from __future__ import annotations

import asyncio

import pytest

from bastion._pool_gate import PoolGate
from bastion.errors import PoolTimeoutError


async def test_waiters_get_their_turn_in_arrival_order() -> None:
    gate = PoolGate(1, timeout_s=5)
    served: list[int] = []
    release = asyncio.Event()

    async def unit(n: int) -> None:
        async with gate:
            served.append(n)
            if n == 0:
                await release.wait()

    first = asyncio.create_task(unit(0))
    await asyncio.sleep(0)
    waiters = [asyncio.create_task(unit(n)) for n in range(1, 6)]
    await asyncio.sleep(0)
    assert gate.waiting == 5
    release.set()
    # A unit arriving after the turn was handed on must not overtake those already waiting.
    await asyncio.sleep(0)
    late = asyncio.create_task(unit(6))
    await asyncio.gather(first, *waiters, late)
    assert served == [0, 1, 2, 3, 4, 5, 6]
    assert gate.waiting == 0


async def test_a_unit_that_waits_too_long_gets_pool_timeout() -> None:
    gate = PoolGate(1, timeout_s=0.05)
    async with gate:
        with pytest.raises(PoolTimeoutError, match="no database connection became free"):
            async with gate:
                pass
    async with gate:  # the timed-out waiter left no turn taken
        assert gate.waiting == 0


async def test_a_cancelled_waiter_passes_its_turn_on() -> None:
    gate = PoolGate(1, timeout_s=5)
    entered: list[str] = []
    hold = asyncio.Event()

    async def unit(name: str) -> None:
        async with gate:
            entered.append(name)
            await hold.wait()

    holder = asyncio.create_task(unit("holder"))
    await asyncio.sleep(0)
    cancelled = asyncio.create_task(unit("cancelled"))
    after = asyncio.create_task(unit("after"))
    await asyncio.sleep(0)
    cancelled.cancel()
    hold.set()
    await asyncio.gather(holder, after)
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert entered == ["holder", "after"]
