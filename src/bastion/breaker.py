"""A circuit breaker in front of the database: fail fast while it is down, probe, recover.

::

    CLOSED ──(BREAKER_FAILURE_THRESHOLD outage errors in a row)──▶ OPEN
      ▲                                                             │
      │                                   BREAKER_RESET_TIMEOUT passes
      │                                                             ▼
      └───────────(the probe succeeds)──── HALF_OPEN ──(it fails)──▶ OPEN

While OPEN, every unit of work is refused at once with
:class:`~bastion.errors.CircuitOpenError` (503 with ``Retry-After``) instead of queueing
for a connection that cannot be made. In HALF_OPEN exactly one unit — the probe — is let
through; the others are still refused until it has answered.

Only *outage* errors count: a connection that cannot be made or was lost, and a server that
did not even answer its own statement timeout. A constraint violation, a conflict, a slow
query or an exhausted pool says nothing about whether the database is up, and a success of
any kind resets the count.

The state is per process, which is what a breaker is for: each worker stops hammering a dead
database on its own. (A shared breaker would need a store that is up when the database is not.)
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from bastion.errors import (
    BastionError,
    CircuitOpenError,
    CommitOutcomeUnknownError,
    DatabaseUnavailableError,
    StatementTimeoutError,
)

__all__ = ["BreakerSnapshot", "BreakerState", "CircuitBreaker", "is_outage"]

logger = logging.getLogger("bastion.breaker")


class BreakerState(enum.Enum):
    """Where the breaker is; see the module docstring for the transitions."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True, slots=True)
class BreakerSnapshot:
    """The breaker's state for health checks and metrics."""

    state: BreakerState
    consecutive_failures: int
    opened_count: int
    retry_after_s: float


def is_outage(error: BastionError) -> bool:
    """Whether ``error`` says the database could not be reached (what the breaker counts)."""
    if isinstance(error, CommitOutcomeUnknownError):
        return True  # the connection was lost mid-COMMIT
    if isinstance(error, StatementTimeoutError):
        # Only the client-side backstop sets no SQLSTATE: the server did not answer at all.
        return error.sqlstate is None
    return isinstance(error, DatabaseUnavailableError) and error.retryable


class CircuitBreaker:
    """Counts outage errors in a row and, past a threshold, refuses work for a while.

    Not thread-safe: it lives on one event loop, like the Database that owns it.
    ``clock`` is injectable so tests can move time.
    """

    def __init__(
        self,
        *,
        failure_threshold: int,
        reset_timeout_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.failure_threshold = failure_threshold
        self.reset_timeout_s = reset_timeout_s
        self._clock = clock
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._opened_count = 0
        self._probe_out = False

    @property
    def state(self) -> BreakerState:
        """The current state (OPEN turns HALF_OPEN once the reset timeout has passed)."""
        if self._state is BreakerState.OPEN and self._retry_after() <= 0:
            return BreakerState.HALF_OPEN
        return self._state

    def snapshot(self) -> BreakerSnapshot:
        """State, failures in a row, how often it opened, and seconds until the next probe."""
        return BreakerSnapshot(
            state=self.state,
            consecutive_failures=self._failures,
            opened_count=self._opened_count,
            retry_after_s=max(self._retry_after(), 0.0) if self._state is BreakerState.OPEN else 0,
        )

    def admit(self) -> bool:
        """Let a unit of work through, or refuse it.

        Returns ``True`` when the admitted unit is the half-open probe; the caller must then
        report its outcome with :meth:`record` or give the slot back with :meth:`release`.

        Raises:
            CircuitOpenError: the breaker is open, or half-open with its probe still out.
        """
        if self._state is BreakerState.CLOSED:
            return False
        if self.state is BreakerState.HALF_OPEN and not self._probe_out:
            self._state = BreakerState.HALF_OPEN
            self._probe_out = True
            return True
        retry_after = max(self._retry_after(), 0.0)
        raise CircuitOpenError(
            "the database is unavailable (circuit breaker open after repeated failures)",
            retry_after_s=retry_after,
        )

    def record(self, error: BastionError | None, *, probe: bool = False) -> None:
        """Report how an admitted unit ended: ``None`` for success, else its error."""
        if probe:
            self._probe_out = False
        if error is not None and is_outage(error):
            self._failures += 1
            # A unit admitted before the breaker opened may fail late (a connect timeout);
            # only the probe, or the run of failures while closed, (re)opens it, so stragglers
            # do not keep pushing the next probe further out.
            if probe or (
                self._state is BreakerState.CLOSED and self._failures >= self.failure_threshold
            ):
                self._open(error)
            return
        if self._state is not BreakerState.CLOSED:
            logger.warning("circuit breaker closed: the database answers again")
        self._state = BreakerState.CLOSED
        self._failures = 0

    def release(self) -> None:
        """Give the probe slot back without an outcome (the probe was cancelled)."""
        self._probe_out = False

    def _open(self, error: BastionError) -> None:
        if self._state is not BreakerState.OPEN:
            self._opened_count += 1
            logger.warning(
                "circuit breaker open after %d failure(s) in a row (%s); refusing work for %gs",
                self._failures,
                error.code,
                self.reset_timeout_s,
            )
        self._state = BreakerState.OPEN
        self._opened_at = self._clock()

    def _retry_after(self) -> float:
        return self._opened_at + self.reset_timeout_s - self._clock()
