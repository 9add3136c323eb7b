"""TurnBudgetMiddleware: request starts paced per event-loop turn, in arrival order, losing none.

The clock is the test's own (a process edge): each request "costs" what the test says by
moving it, so which requests fit in a turn does not depend on the machine's speed.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from starlette.types import Receive, Scope, Send

from bastion.fastapi import TurnBudgetMiddleware
from tests.unit.leaving_client import Client

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
        self.received: dict[str, dict[str, Any]] = {}
        self.release_stream = asyncio.Event()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.started.append((scope["path"], self.turns.count))
        self.received[scope["path"]] = dict(await receive())
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
    assert middleware.paced == 10
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


@pytest.mark.parametrize("probe_path", ["/health/ready", "/metrics"])
async def test_health_probes_and_metrics_scrapes_are_never_paced(probe_path: str) -> None:
    middleware, app, _, turns = setup()

    async def busy_then_probe() -> list[int]:
        calls = [asyncio.ensure_future(call(middleware, f"/r{n}")) for n in range(6)]
        await asyncio.sleep(0)  # the first three start, the rest wait
        probe = await call(middleware, probe_path)
        return [probe, *await asyncio.gather(*calls)]

    statuses = await in_turns(turns, busy_then_probe)
    assert statuses == [200] * 7
    order = [path for path, _ in app.started]
    assert order.index(probe_path) < order.index("/r3")  # ahead of the waiting ones
    assert middleware.paced == 6  # the probe is not counted as paced


@contextlib.contextmanager
def loop_errors() -> Iterator[list[dict[str, Any]]]:
    """The errors the running loop reports while the block runs (a callback that raised)."""
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: errors.append(context))
    try:
        yield errors
    finally:
        loop.set_exception_handler(previous)


async def test_a_request_cancelled_while_waiting_gives_its_place_to_the_next() -> None:
    middleware, app, _, turns = setup()

    async def cancel_one() -> list[Any]:
        calls = [asyncio.ensure_future(call(middleware, f"/r{n}")) for n in range(9)]
        await asyncio.sleep(0)  # r0-r2 started, r3-r8 wait
        calls[3].cancel()
        return await asyncio.gather(*calls, return_exceptions=True)

    with loop_errors() as errors:
        outcomes = await in_turns(turns, cancel_one)
    assert errors == []
    assert isinstance(outcomes[3], asyncio.CancelledError)
    assert [outcome for n, outcome in enumerate(outcomes) if n != 3] == [200] * 8
    turn_of = dict(app.started)
    assert "/r3" not in turn_of
    # The next turn starts three (it learnt that three fit): r4, r5 and, in r3's place, r6.
    assert turn_of["/r6"] == turn_of["/r4"] > turn_of["/r2"]

    # Nothing is left waiting: the next request, in a fresh turn, starts at once.
    deferred = middleware.deferred
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert await in_turns(turns, lambda: call(middleware, "/after")) == 200
    assert middleware.deferred == deferred


async def test_a_request_cancelled_after_its_start_was_granted_passes_it_on() -> None:
    middleware, app, clock, turns = setup()

    async def cancel_a_woken_one() -> list[Any]:
        calls = [asyncio.ensure_future(call(middleware, f"/r{n}")) for n in range(9)]
        await asyncio.sleep(0)  # r0-r2 started, r3-r8 wait
        await asyncio.sleep(0)  # the per-turn callback has granted r3-r5 their start
        calls[3].cancel()
        clock.now += 1.0  # a long turn: the next callback starts two only (r6, r7)
        return await asyncio.gather(*calls, return_exceptions=True)

    with loop_errors() as errors:
        outcomes = await asyncio.wait_for(in_turns(turns, cancel_a_woken_one), 1)
    assert errors == []
    assert isinstance(outcomes[3], asyncio.CancelledError)
    assert [outcome for n, outcome in enumerate(outcomes) if n != 3] == [200] * 8
    turn_of = dict(app.started)
    assert "/r3" not in turn_of
    # r3's granted start went to the first still waiting, r8, beside r6 and r7.
    assert turn_of["/r8"] == turn_of["/r6"] == turn_of["/r7"]


async def test_a_started_streaming_response_holds_nothing() -> None:
    middleware, app, _, turns = setup()

    async def stream_then_others() -> list[int]:
        stream = asyncio.ensure_future(call(middleware, "/stream"))
        await asyncio.sleep(0)
        # All served while the stream is still open: were it holding a slot, this would hang.
        others = await asyncio.wait_for(
            asyncio.gather(*(call(middleware, f"/r{n}") for n in range(8))), 1
        )
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

    # Closed with its waiters still queued (no cancellation): its queue must not be the
    # next loop's.
    first = asyncio.new_event_loop()
    try:
        first.run_until_complete(abandon_waiters())
    finally:
        first.close()

    async def serve_again() -> list[int]:
        work = asyncio.gather(*(call(middleware, f"/second{n}") for n in range(5)))
        return await in_turns(turns, lambda: asyncio.wait_for(work, 1))

    assert asyncio.run(serve_again()) == [200] * 5
    assert [path for path, _ in app.started][-5:] == [f"/second{n}" for n in range(5)]


def test_two_loops_at_once_are_paced_apart() -> None:
    middleware, app, _, _ = setup()
    barrier = threading.Barrier(2)

    def serve(name: str) -> list[int]:
        async def burst() -> list[int]:
            barrier.wait(timeout=5)  # both loops busy with the middleware at the same time
            work = asyncio.gather(*(call(middleware, f"/{name}{n}") for n in range(20)))
            return await asyncio.wait_for(work, 5)

        return asyncio.run(burst())

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(serve, ["a", "b"]))
    assert results == [[200] * 20, [200] * 20]
    assert len(app.started) == 40


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
    assert middleware.paced == 0


def test_a_single_string_of_prefixes_is_refused() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        return None

    with pytest.raises(TypeError, match="not a string"):
        TurnBudgetMiddleware(app, exempt_prefixes="/health")


@pytest.mark.parametrize("budget_s", [0.0, -0.001, float("nan")])
def test_a_budget_that_is_not_positive_is_refused(budget_s: float) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        return None

    with pytest.raises(ValueError, match="budget_s must be positive"):
        TurnBudgetMiddleware(app, budget_s=budget_s)


async def slow_then(middleware: TurnBudgetMiddleware, *clients: Client) -> None:
    """``/slow`` uses up the turn, ``clients`` arrive in it and wait; the first leaves before
    the next turn starts them."""
    slow = asyncio.ensure_future(call(middleware, "/slow"))
    waiting = [asyncio.ensure_future(client.request(middleware)) for client in clients]
    await asyncio.sleep(0)  # all arrive in this turn
    clients[0].leave()
    await asyncio.wait_for(asyncio.gather(slow, *waiting), 1)


async def test_a_request_whose_client_left_while_it_waited_is_dropped_unserved() -> None:
    middleware, app, _, turns = setup()
    leaves, stays = Client("/leaves"), Client("/stays")
    await in_turns(turns, lambda: slow_then(middleware, leaves, stays))

    assert [path for path, _ in app.started] == ["/slow", "/stays"]
    assert leaves.sent == []
    assert stays.sent[0]["status"] == 200
    # The request the middleware looked at on the way is the app's, unchanged.
    assert app.received["/stays"] == {"type": "http.request", "body": b"", "more_body": False}
    assert (middleware.deferred, middleware.abandoned) == (2, 1)


async def test_a_request_with_a_body_whose_client_left_while_it_waited_is_dropped_too() -> None:
    middleware, app, _, turns = setup()
    leaves, stays = Client("/leaves", b"a body"), Client("/stays", b"its body")
    await in_turns(turns, lambda: slow_then(middleware, leaves, stays))

    assert [path for path, _ in app.started] == ["/slow", "/stays"]
    assert leaves.sent == []
    assert app.received["/stays"]["body"] == b"its body"
    assert middleware.abandoned == 1


async def test_a_request_that_did_not_wait_is_not_looked_at() -> None:
    # Only a request that waited is checked: one started at once runs even if its client
    # left (its route sees the disconnect, as without the middleware), at no extra cost.
    middleware, app, _, turns = setup()
    gone = Client("/gone")
    gone.leave()
    await in_turns(turns, lambda: gone.request(middleware))

    assert [path for path, _ in app.started] == ["/gone"]
    assert (middleware.deferred, middleware.abandoned) == (0, 0)


async def test_a_dropped_request_passes_its_start_on() -> None:
    # As a cancelled one does: clients hang up most when the service is busiest, and a start
    # spent on one that left would leave the turn a request short.
    middleware, app, clock, turns = setup()
    leaves = Client("/r3")

    async def drop_a_woken_one() -> list[Any]:
        calls = [
            asyncio.ensure_future(
                leaves.request(middleware) if n == 3 else call(middleware, f"/r{n}")
            )
            for n in range(9)
        ]
        await asyncio.sleep(0)  # r0-r2 started, r3-r8 wait
        await asyncio.sleep(0)  # the per-turn callback has granted r3-r5 their start
        leaves.leave()
        clock.now += 1.0  # a long turn: the next callback starts two only (r6, r7)
        return await asyncio.gather(*calls)

    await asyncio.wait_for(in_turns(turns, drop_a_woken_one), 1)
    turn_of = dict(app.started)
    assert "/r3" not in turn_of
    assert middleware.abandoned == 1
    # r3's start went to the first still waiting, r8, beside r6 and r7.
    assert turn_of["/r8"] == turn_of["/r6"] == turn_of["/r7"]
