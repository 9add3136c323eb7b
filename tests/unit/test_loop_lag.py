"""The loop-lag monitor sees a blocked event loop."""

import asyncio
import time

import pytest

from bastion.loop_lag import LoopLagMonitor


async def test_a_blocked_loop_shows_up_as_lag() -> None:
    monitor = LoopLagMonitor(interval_s=0.01, window_s=5)
    await monitor.start()
    await asyncio.sleep(0.05)
    time.sleep(0.2)  # noqa: ASYNC251 - blocks the loop on purpose, like a sync driver call
    await asyncio.sleep(0.05)
    await monitor.stop()

    lag = monitor.snapshot()
    assert lag.samples >= 3
    assert lag.max_ms >= 150
    assert lag.p50_ms < 100  # most wake-ups were on time: only the blocked one was late


def test_an_idle_monitor_reports_zeros() -> None:
    assert LoopLagMonitor().snapshot().samples == 0


@pytest.mark.parametrize(("interval", "window"), [(0, 1), (1, 0), (-1, 1)])
def test_nonsense_intervals_are_refused(interval: float, window: float) -> None:
    with pytest.raises(ValueError, match="positive"):
        LoopLagMonitor(interval_s=interval, window_s=window)
