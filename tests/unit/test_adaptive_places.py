"""AdaptivePlaces: at most ``limit`` requests at once, the rest in arrival order, none lost;
and the limit's moves by how long requests take (bastion.fastapi._adaptive_places).

The times are fed by hand through ``observe`` and the clock is the test's, so every move of
the limit here is deterministic.
"""

from __future__ import annotations

import asyncio

import pytest

from bastion.fastapi._adaptive_places import MIN_WINDOW_S, WINDOW, AdaptivePlaces


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def takers(places: AdaptivePlaces, count: int) -> list[asyncio.Task[None]]:
    """``count`` tasks taking a place, started in order; returns once each holds or waits."""
    tasks = []
    for _ in range(count):
        tasks.append(asyncio.create_task(places.acquire()))
        await asyncio.sleep(0)
    return tasks


def window(places: AdaptivePlaces, shortest: float, typical: float) -> None:
    """One window of requests: one as fast as ``shortest``, the rest taking ``typical``."""
    places.observe(shortest)
    for _ in range(WINDOW - 1):
        places.observe(typical)


async def test_at_most_the_limit_hold_a_place_and_the_rest_start_in_arrival_order() -> None:
    places = AdaptivePlaces(least=2, most=8)
    first, second, third, fourth = await takers(places, 4)

    assert [task.done() for task in (first, second, third, fourth)] == [True, True, False, False]
    assert (places.taken, places.waiting, places.locked()) == (2, 2, True)
    places.release()
    await asyncio.sleep(0)
    assert (third.done(), fourth.done()) == (True, False)
    places.release()
    await asyncio.sleep(0)
    assert fourth.done()
    assert (places.taken, places.waiting) == (2, 0)


async def test_a_cancelled_waiter_keeps_no_place_and_a_granted_one_passes_it_on() -> None:
    places = AdaptivePlaces(least=1, most=1)
    holder, cancelled, granted_then_cancelled, last = await takers(places, 4)

    cancelled.cancel()
    await asyncio.sleep(0)
    places.release()  # grants granted_then_cancelled, which is cancelled before it runs
    granted_then_cancelled.cancel()
    await asyncio.sleep(0)
    await asyncio.sleep(0)

    assert holder.done()
    assert cancelled.cancelled()
    assert granted_then_cancelled.cancelled()
    assert last.done()
    assert (places.taken, places.waiting) == (1, 0)


async def test_requests_no_slower_than_the_shortest_raise_the_limit_and_start_waiters() -> None:
    places = AdaptivePlaces(least=2, most=64, clock=Clock())
    tasks = await takers(places, 40)

    for _ in range(10):
        window(places, shortest=0.010, typical=0.010)
    await asyncio.sleep(0)

    assert places.limit > 2
    assert places.taken == places.limit  # each new place went to a waiting request
    for task in tasks:
        task.cancel()


async def test_requests_slowed_by_their_number_bring_the_limit_down_but_not_below_least() -> None:
    for least, settled in ((3, 4), (5, 5)):
        places = AdaptivePlaces(least=least, most=64, clock=Clock())
        for _ in range(40):
            window(places, shortest=0.001, typical=0.001)
        grown = places.limit
        assert grown > 10

        for _ in range(60):
            window(places, shortest=0.001, typical=0.010)  # ten times the shortest: gradient 0.5

        # limit * 0.5 + sqrt(limit) = limit at 4: the limit settles there, or at least.
        assert places.limit == settled


async def test_the_limit_never_passes_most() -> None:
    places = AdaptivePlaces(least=2, most=6, clock=Clock())

    for _ in range(100):
        window(places, shortest=0.001, typical=0.001)

    assert places.limit == 6


async def test_the_shortest_time_is_forgotten_so_a_lasting_slowdown_is_not_taken_for_overload() -> (
    None
):
    clock = Clock()
    places = AdaptivePlaces(least=2, most=64, clock=clock)
    for _ in range(30):
        window(places, shortest=0.001, typical=0.001)
    before = places.limit

    clock.now += MIN_WINDOW_S  # then every request takes 20 ms, from now on
    for _ in range(10):
        window(places, shortest=0.020, typical=0.020)

    assert places.limit > before  # not pulled down by the 1 ms of before


def test_a_bad_range_is_refused() -> None:
    with pytest.raises(ValueError, match="1 <= min_in_flight <= max_in_flight"):
        AdaptivePlaces(least=0, most=4)
    with pytest.raises(ValueError, match="1 <= min_in_flight <= max_in_flight"):
        AdaptivePlaces(least=5, most=4)
