"""run_to_completion: a cancelled waiter waits for the call; the call's own deadlines still work."""

from __future__ import annotations

import asyncio

import anyio
import pytest

from bastion._to_completion import run_to_completion


async def _slow(events: list[str], fail: bool = False) -> str:
    events.append("call started")
    await asyncio.sleep(0.2)
    events.append("call ended")
    if fail:
        raise ValueError("refused")
    return "done"


async def test_the_call_s_result_and_error_pass_through() -> None:
    events: list[str] = []
    assert await run_to_completion(_slow(events), name="probe") == "done"
    with pytest.raises(ValueError, match="refused"):
        await run_to_completion(_slow(events, fail=True), name="probe")


async def test_a_cancelled_waiter_gets_its_cancellation_once_the_call_is_over() -> None:
    events: list[str] = []

    async def waiter(fail: bool) -> None:
        try:
            await run_to_completion(_slow(events, fail), name="probe")
        finally:
            events.append("waiter resumed")

    for fail in (False, True):
        events.clear()
        task = asyncio.create_task(waiter(fail))
        await asyncio.sleep(0.05)
        task.cancel()
        task.cancel()  # a second cancellation changes nothing
        with pytest.raises(asyncio.CancelledError) as raised:
            await task
        assert events == ["call started", "call ended", "waiter resumed"]
        assert isinstance(raised.value.__cause__, ValueError) is fail


async def test_asyncio_timeout_around_the_call_fires_after_it() -> None:
    events: list[str] = []
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await run_to_completion(_slow(events), name="probe")
    assert events == ["call started", "call ended"]
    current = asyncio.current_task()
    assert current is not None
    assert current.cancelling() == 0


async def test_an_anyio_scope_around_the_call_ends_after_it() -> None:
    events: list[str] = []
    with anyio.move_on_after(0.05) as scope:
        result = await run_to_completion(_slow(events), name="probe")
        events.append(f"returned {result}")
        await asyncio.sleep(0)  # the scope's cancellation arrives at the next await
        events.append("not reached")
    assert scope.cancelled_caught
    assert events == ["call started", "call ended", "returned done"]


async def test_a_deadline_inside_the_call_still_cancels_it() -> None:
    # The call runs in an ordinary task: its own asyncio.timeout (asyncpg's command_timeout on
    # a close is one) must fire, not wait for ever.
    async def with_its_own_deadline() -> None:
        async with asyncio.timeout(0.05):
            await asyncio.sleep(30)

    started = asyncio.get_running_loop().time()
    with pytest.raises(TimeoutError):
        await run_to_completion(with_its_own_deadline(), name="probe")
    assert asyncio.get_running_loop().time() - started < 10
