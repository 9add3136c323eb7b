"""The circuit breaker's state machine, on a clock the test moves."""

from __future__ import annotations

import pytest

from bastion import (
    BreakerState,
    CircuitBreaker,
    CircuitOpenError,
    DatabaseUnavailableError,
    PoolTimeoutError,
    StatementTimeoutError,
    TransactionConflictError,
    UniqueViolationError,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def outage() -> DatabaseUnavailableError:
    return DatabaseUnavailableError("down")


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def breaker(clock: Clock) -> CircuitBreaker:
    return CircuitBreaker(failure_threshold=3, reset_timeout_s=2.0, clock=clock)


def fail(breaker: CircuitBreaker, times: int) -> None:
    for _ in range(times):
        probe = breaker.admit()
        breaker.record(outage(), probe=probe)


def test_it_opens_after_the_threshold_of_outages_in_a_row(breaker: CircuitBreaker) -> None:
    fail(breaker, 2)
    assert breaker.state is BreakerState.CLOSED
    fail(breaker, 1)
    assert breaker.state is BreakerState.OPEN
    with pytest.raises(CircuitOpenError) as refused:
        breaker.admit()
    assert 0 < refused.value.retry_after_s <= 2.0
    assert breaker.snapshot().opened_count == 1


def test_a_success_resets_the_run(breaker: CircuitBreaker) -> None:
    fail(breaker, 2)
    breaker.record(None)
    fail(breaker, 2)
    assert breaker.state is BreakerState.CLOSED


@pytest.mark.parametrize(
    "error",
    [
        PoolTimeoutError("busy"),
        TransactionConflictError("conflict"),
        UniqueViolationError("dup"),
        StatementTimeoutError("slow", sqlstate="57014"),
        DatabaseUnavailableError("bad password", sqlstate="28P01", retryable=False),
    ],
    ids=["pool-timeout", "conflict", "unique", "server-timeout", "auth"],
)
def test_errors_that_are_not_outages_never_open_it(
    breaker: CircuitBreaker, error: DatabaseUnavailableError
) -> None:
    for _ in range(10):
        breaker.admit()
        breaker.record(error)
    assert breaker.state is BreakerState.CLOSED


def test_a_client_side_timeout_counts_as_an_outage(breaker: CircuitBreaker) -> None:
    for _ in range(3):
        breaker.admit()
        breaker.record(StatementTimeoutError("no answer"))
    assert breaker.state is BreakerState.OPEN


def test_after_the_reset_timeout_one_probe_goes_through_and_its_success_closes_it(
    breaker: CircuitBreaker, clock: Clock
) -> None:
    fail(breaker, 3)
    clock.now += 2.01
    assert breaker.state is BreakerState.HALF_OPEN

    assert breaker.admit() is True  # the probe
    with pytest.raises(CircuitOpenError):
        breaker.admit()  # everyone else waits for the probe's answer
    breaker.record(None, probe=True)

    assert breaker.state is BreakerState.CLOSED
    assert breaker.admit() is False


def test_a_failed_probe_reopens_it_for_another_full_timeout(
    breaker: CircuitBreaker, clock: Clock
) -> None:
    fail(breaker, 3)
    clock.now += 2.5
    breaker.record(outage(), probe=breaker.admit())

    assert breaker.state is BreakerState.OPEN
    clock.now += 1.9
    with pytest.raises(CircuitOpenError):
        breaker.admit()
    clock.now += 0.2
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.snapshot().opened_count == 2  # every transition to OPEN counts


def test_a_cancelled_probe_gives_its_slot_back(breaker: CircuitBreaker, clock: Clock) -> None:
    fail(breaker, 3)
    clock.now += 3
    assert breaker.admit() is True
    breaker.release()
    assert breaker.admit() is True


def test_late_failures_of_units_admitted_earlier_do_not_postpone_the_probe(
    breaker: CircuitBreaker, clock: Clock
) -> None:
    fail(breaker, 3)
    clock.now += 1.5
    breaker.record(outage())  # a straggler admitted before it opened
    clock.now += 0.6
    assert breaker.state is BreakerState.HALF_OPEN
