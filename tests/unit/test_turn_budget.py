"""TurnBudgetMiddleware: request starts paced per event-loop turn, in arrival order, losing none.

The clock is the test's own (a process edge): each request "costs" what the test says by
moving it, so which requests fit in a turn does not depend on the machine's speed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
from starlette.types import Receive, Scope, Send

from bastion.fastapi import TurnBudgetMiddleware

BUDGET_S = 0.0025
COST_S = 0.001  # three requests fit in a turn (0, 1 and 2 ms into it); the fourth waits


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Turns:
    """Counts the loop's turns while it runs: a callback that reschedules itself each turn."""

    def __init__(self) -> None:
        self.count = 0
        self._running = False

    def start(self) -> None:
        self._running = True
        asyncio.get_running_loop().call_soon(self._tick)

    def stop(self) -> None:
        self._running = False

    def _tick(self) -> None:
        self.count += 1
        if self._running:
            asyncio.get_running_loop().call_soon(self._tick)


class RecordingApp:
    """Answers 200; records each request's path and the turn it started in, and charges
    ``cost_s`` of the fake clock for it (``/slow``: a whole second). ``/stream`` starts its
    response and then waits."""

    def __init__(self, clock: FakeClock, turns: Turns, cost_s: float = COST_S) -> None:
        self.clock = clock
        self.turns = turns
        self.cost_s = cost_s
        self.started: list[tuple[str, int]] = []
        self.release_stream = asyncio.Event()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.started.append((scope["path"], self.turns.count))
        self.clock.now += 1.0 if scope["path"] == "/slow" else self.cost_s
        await send({"type": "http.response.start", "status": 200, "headers": []})
        if scope["path"] == "/stream":
            await self.release_stream.wait()
        await send({"type": "http.response.body", "body": b"ok"})


async def call(middleware: TurnBudgetMiddleware, path: str) -> int:
    """Send one GET of ``path`` through ``middleware``; its status."""
    scope: Scope = {"type": "http", "method": "GET", "path": path, "headers": []}
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await middleware(scope, receive, send)
    return int(sent[0]["status"])


def setup(cost_s: float = COST_S) -> tuple[TurnBudgetMiddleware, RecordingApp, FakeClock, Turns]:
    clock, turns = FakeClock(), Turns()
    app = RecordingApp(clock, turns, cost_s)
    return TurnBudgetMiddleware(app, budget_s=BUDGET_S, clock=clock), app, clock, turns


async def in_turns(turns: Turns, work: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    turns.start()
    try:
        return await work()
    finally:
        turns.stop()


async def test_requests_within_the_budget_start_at_once() -> None:
    middleware, app, _, turns = setup()
    statuses = await in_turns(
        turns, lambda: asyncio.gather(call(middleware, "/a"), call(middleware, "/b"))
    )
    assert statuses == [200, 200]
    assert middleware.deferred == 0
    assert {turn for _, turn in app.started} == {app.started[0][1]}  # both in one turn


async def test_requests_over_the_budget_wait_for_later_turns_in_arrival_order() -> None:
    middleware, app, _, turns = setup()
    paths = [f"/r{n}" for n in range(10)]
    statuses = await in_turns(
        turns, lambda: asyncio.gather(*(call(middleware, path) for path in paths))
    )
    assert statuses == [200] * 10  # none lost
    assert [path for path, _ in app.started] == paths  # first come, first started
    assert middleware.started == 10
    assert middleware.deferred == 7  # three fit in the first turn
    first_turn = app.started[0][1]
    assert [turn for _, turn in app.started[:3]] == [first_turn] * 3
    assert all(turn > first_turn for _, turn in app.started[3:])


async def test_a_newcomer_waits_behind_those_waiting_even_in_a_turn_with_room() -> None:
    middleware, app, _, turns = setup()

    async def arrive_late() -> list[int]:
        calls = [asyncio.ensure_future(call(middleware, f"/r{n}")) for n in range(10)]
        await asyncio.sleep(0)  # r0-r2 started, r3-r9 wait
        await asyncio.sleep(0)
        # Arrives in the next turn, right after the per-turn callback woke r3-r5: that turn
        # has run nothing yet, but r6-r9 still wait, so it goes behind them.
        late = await call(middleware, "/late")
        return [*await asyncio.gather(*calls), late]

    assert await in_turns(turns, arrive_late) == [200] * 11
    assert [path for path, _ in app.started] == [*(f"/r{n}" for n in range(10)), "/late"]


async def test_a_turn_over_budget_starts_fewer_next_time() -> None:
    middleware, _, _, turns = setup()
    before = middleware.per_turn
    await in_turns(turns, lambda: asyncio.gather(*(call(middleware, f"/{n}") for n in range(10))))
    assert middleware.per_turn < before  # the turns ran 2 to 3 ms, over the 2.5 ms budget


async def test_short_turns_start_more_next_time() -> None:
    middleware, app, _, turns = setup(cost_s=0.0)
    before = middleware.per_turn
    # /slow fills the first turn, so the others wait and are started turn by turn, in turns
    # that now cost nothing.
    paths = ["/slow", *(f"/{n}" for n in range(40))]
    statuses = await in_turns(
        turns, lambda: asyncio.gather(*(call(middleware, path) for path in paths))
    )
    assert statuses == [200] * 41
    assert middleware.deferred == 40
    assert middleware.per_turn > before
    assert [path for path, _ in app.started] == paths


async def test_health_probes_are_never_paced() -> None:
    middleware, app, _, turns = setup()

    async def busy_then_probe() -> list[int]:
        calls = [asyncio.ensure_future(call(middleware, f"/r{n}")) for n in range(6)]
        await asyncio.sleep(0)  # the first three start, the rest wait
        probe = await call(middleware, "/health/ready")
        return [probe, *await asyncio.gather(*calls)]

    statuses = await in_turns(turns, busy_then_probe)
    assert statuses == [200] * 7
    order = [path for path, _ in app.started]
    assert order.index("/health/ready") < order.index("/r3")  # ahead of the waiting ones
    assert middleware.started == 6  # the probe is not counted as paced


async def test_a_request_cancelled_while_waiting_gives_its_place_to_the_next() -> None:
    middleware, app, _, turns = setup()

    async def cancel_one() -> list[Any]:
        calls = [asyncio.ensure_future(call(middleware, f"/r{n}")) for n in range(6)]
        await asyncio.sleep(0)  # r0-r2 started, r3-r5 wait
        calls[3].cancel()
        return await asyncio.gather(*calls, return_exceptions=True)

    outcomes = await in_turns(turns, cancel_one)
    assert isinstance(outcomes[3], asyncio.CancelledError)
    assert [outcome for n, outcome in enumerate(outcomes) if n != 3] == [200] * 5
    assert [path for path, _ in app.started] == ["/r0", "/r1", "/r2", "/r4", "/r5"]

    # Nothing is left waiting: the next request, in a fresh turn, starts at once.
    deferred = middleware.deferred
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert await in_turns(turns, lambda: call(middleware, "/after")) == 200
    assert middleware.deferred == deferred


async def test_a_started_streaming_response_holds_nothing() -> None:
    middleware, app, _, turns = setup()

    async def stream_then_others() -> list[int]:
        stream = asyncio.ensure_future(call(middleware, "/stream"))
        await asyncio.sleep(0)
        others = await asyncio.gather(*(call(middleware, f"/r{n}") for n in range(8)))
        assert not stream.done()  # still streaming while all the others were served
        app.release_stream.set()
        return [await stream, *others]

    assert await in_turns(turns, stream_then_others) == [200] * 9


def test_each_event_loop_gets_its_own_queue() -> None:
    middleware, app, _, turns = setup()

    async def abandon_waiters() -> None:
        turns.start()
        calls = [asyncio.ensure_future(call(middleware, f"/first{n}")) for n in range(6)]
        await asyncio.sleep(0)  # three start, three are left waiting when the loop ends
        turns.stop()
        assert sum(task.done() for task in calls) == 3

    asyncio.run(abandon_waiters())

    async def serve_again() -> list[int]:
        return await in_turns(
            turns, lambda: asyncio.gather(*(call(middleware, f"/second{n}") for n in range(5)))
        )

    assert asyncio.run(serve_again()) == [200] * 5
    assert [path for path, _ in app.started][-5:] == [f"/second{n}" for n in range(5)]


async def test_lifespan_and_websocket_scopes_pass_through() -> None:
    seen: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope["type"])

    middleware = TurnBudgetMiddleware(app, budget_s=BUDGET_S, clock=FakeClock())

    async def nothing() -> dict[str, Any]:
        return {}

    async def discard(message: dict[str, Any]) -> None:
        return None

    await middleware({"type": "lifespan"}, nothing, discard)
    await middleware({"type": "websocket", "path": "/ws"}, nothing, discard)
    assert seen == ["lifespan", "websocket"]
    assert middleware.started == 0


@pytest.mark.parametrize("budget_s", [0.0, -0.001, float("nan")])
def test_a_budget_that_is_not_positive_is_refused(budget_s: float) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        return None

    with pytest.raises(ValueError, match="budget_s must be positive"):
        TurnBudgetMiddleware(app, budget_s=budget_s)
