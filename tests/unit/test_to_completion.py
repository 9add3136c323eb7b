"""run_to_completion: a cancelled waiter waits for the call; the call's own deadlines still work.

The calls wait for an event the test sets, so every ordering below is decided by the test, not
by the clock.
"""

from __future__ import annotations

import asyncio

import anyio
import pytest

from bastion._to_completion import run_to_completion


class Call:
    """A call that runs until :attr:`release` is set, noting its steps in :attr:`events`."""

    def __init__(self, *, fail: bool = False) -> None:
        self.events: list[str] = []
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.fail = fail

    async def __call__(self) -> str:
        self.events.append("call started")
        self.started.set()
        await self.release.wait()
        self.events.append("call ended")
        if self.fail:
            raise ValueError("refused")
        return "done"


async def test_the_call_s_result_and_error_pass_through() -> None:
    for fail in (False, True):
        call = Call(fail=fail)
        call.release.set()
        if fail:
            with pytest.raises(ValueError, match="refused"):
                await run_to_completion(call(), name="probe")
        else:
            assert await run_to_completion(call(), name="probe") == "done"


async def test_a_cancelled_waiter_gets_its_cancellation_once_the_call_is_over() -> None:
    for fail in (False, True):
        call = Call(fail=fail)

        async def waiter(call: Call = call) -> None:
            try:
                await run_to_completion(call(), name="probe")
            finally:
                call.events.append("waiter resumed")

        task = asyncio.create_task(waiter())
        await call.started.wait()
        task.cancel()
        task.cancel()  # a second cancellation changes nothing
        for _ in range(5):
            await asyncio.sleep(0)
        assert call.events == ["call started"]  # the waiter still waits for the call
        call.release.set()
        with pytest.raises(asyncio.CancelledError) as raised:
            await task
        assert call.events == ["call started", "call ended", "waiter resumed"]
        assert isinstance(raised.value.__cause__, ValueError) is fail


async def test_asyncio_timeout_around_the_call_fires_after_it() -> None:
    call = Call()

    async def release_after_the_deadline() -> None:
        await call.started.wait()
        await asyncio.sleep(0.05)  # past the 0.01 s deadline below
        call.release.set()

    releasing = asyncio.create_task(release_after_the_deadline())
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.01):
            await run_to_completion(call(), name="probe")
    await releasing
    assert call.events == ["call started", "call ended"]
    current = asyncio.current_task()
    assert current is not None
    assert current.cancelling() == 0


async def test_an_anyio_scope_around_the_call_ends_after_it() -> None:
    call = Call()
    events = call.events
    with anyio.CancelScope() as scope:

        async def cancel_then_release() -> None:
            await call.started.wait()
            scope.cancel()
            for _ in range(5):
                await asyncio.sleep(0)
            events.append("scope cancelled")
            call.release.set()

        releasing = asyncio.create_task(cancel_then_release())
        result = await run_to_completion(call(), name="probe")
        events.append(f"returned {result}")
        await asyncio.sleep(0)  # the scope's cancellation arrives at the next await
        events.append("not reached")
    await releasing
    assert scope.cancelled_caught
    assert events == ["call started", "scope cancelled", "call ended", "returned done"]


async def test_a_deadline_inside_the_call_still_cancels_it() -> None:
    # The call runs in an ordinary task: its own asyncio.timeout (asyncpg's command_timeout on
    # a close is one) must fire. Were the call's task to refuse cancellation, the sleep would
    # run to its end and no TimeoutError be raised.
    events: list[str] = []

    async def with_its_own_deadline() -> None:
        try:
            async with asyncio.timeout(0.01):
                await asyncio.sleep(30)
        except TimeoutError:
            events.append("deadline fired")
            raise

    with pytest.raises(TimeoutError):
        await run_to_completion(with_its_own_deadline(), name="probe")
    assert events == ["deadline fired"]
