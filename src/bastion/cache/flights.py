"""Single flight: concurrent loads of one key within a process share one call to the source.

The first caller (the leader) runs the load in its own task — with its own connection and
cancellation — and the others wait for its outcome. A follower is never handed a value it must
not see: flights are keyed by the key *and* the invalidation generations the caller read, so
a caller that saw a newer generation (it started after a write) never joins a load that began
before it; when the leader is cancelled, or reports its value stale, the followers start over;
:meth:`SingleFlight.forget` (called on invalidation) covers loads that run without Redis.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Final, Generic, TypeVar

__all__ = ["Outcome", "SingleFlight"]

T = TypeVar("T")
_MAX_RESTARTS: Final = 3  # then load alone: a key rewritten without pause must not starve us


class Outcome(Generic[T]):
    """What a leader's load produced: its value and, when ``shared``, what followers get."""

    __slots__ = ("shared", "value")

    def __init__(self, value: T, shared: Any, *, shareable: bool) -> None:
        self.value = value
        self.shared = shared if shareable else _NOT_SHAREABLE


class _RestartError(Exception):
    """The leader went away or its value went stale: followers load again."""


_NOT_SHAREABLE: Final = object()


class SingleFlight:
    """One load per key at a time; followers share the leader's (shareable) result."""

    def __init__(self) -> None:
        self._flights: dict[tuple[str, Any], asyncio.Future[Any]] = {}

    def __len__(self) -> int:
        return len(self._flights)

    async def run(
        self,
        key: tuple[str, Any],
        load: Callable[[], Awaitable[Outcome[T]]],
        share: Callable[[Any], T],
    ) -> T:
        """The leader's ``load().value``, or ``share(shared)`` of a concurrent leader's result.

        Raises:
            Exception: whatever ``load`` raised (followers get the leader's error too).
        """
        for _ in range(_MAX_RESTARTS):
            flight = self._flights.get(key)
            if flight is None:
                break
            try:
                # shield: a follower's cancellation must not cancel the leader's future.
                shared = await asyncio.shield(flight)
            except _RestartError:
                continue
            return share(shared)
        flight = asyncio.get_running_loop().create_future()
        flight.add_done_callback(_consume)
        self._flights.setdefault(key, flight)
        try:
            outcome = await load()
        except asyncio.CancelledError:
            flight.set_exception(_RestartError())
            raise
        except BaseException as exc:
            flight.set_exception(exc)
            raise
        finally:
            if self._flights.get(key) is flight:
                del self._flights[key]
        if outcome.shared is _NOT_SHAREABLE:
            flight.set_exception(_RestartError())
        else:
            flight.set_result(outcome.shared)
        return outcome.value

    def forget(self, key: str | None = None) -> None:
        """Let the next caller of ``key`` (of every key when ``None``) start a new load."""
        if key is None:
            self._flights.clear()
            return
        for flight_key in [flight_key for flight_key in self._flights if flight_key[0] == key]:
            del self._flights[flight_key]


def _consume(flight: asyncio.Future[Any]) -> None:
    # Mark the exception retrieved: a flight nobody followed must not log "never retrieved".
    if not flight.cancelled():
        flight.exception()
