"""Event-loop lag: how late a periodic timer fires, the first sign of a blocked loop.

A task sleeps ``interval_s`` again and again and records how much later than asked it woke
up. Anything that blocks the loop — a synchronous driver call, a long CPU-bound step — shows
up as lag for every request at once, so it is worth watching beside latency.

>>> monitor = LoopLagMonitor()          # doctest: +SKIP
>>> await monitor.start()
>>> monitor.snapshot().p99_ms
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from dataclasses import dataclass

__all__ = ["LoopLag", "LoopLagMonitor"]


@dataclass(frozen=True, slots=True)
class LoopLag:
    """Lag percentiles over the monitor's window, in milliseconds."""

    samples: int
    p50_ms: float
    p99_ms: float
    max_ms: float


class LoopLagMonitor:
    """Measures the running loop's lag over the last ``window_s`` seconds.

    Raises:
        ValueError: ``interval_s`` or ``window_s`` is not positive.
    """

    def __init__(self, *, interval_s: float = 0.02, window_s: float = 30.0) -> None:
        if interval_s <= 0 or window_s <= 0:
            raise ValueError("interval_s and window_s must be positive")
        self.interval_s = interval_s
        self._lags_s: deque[float] = deque(maxlen=max(1, int(window_s / interval_s)))
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start sampling on the running loop (a second call does nothing)."""
        if self._task is None:
            self._task = asyncio.create_task(self._sample(), name="bastion-loop-lag")

    async def stop(self) -> None:
        """Stop sampling."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def snapshot(self) -> LoopLag:
        """Percentiles of the lags recorded in the window (zeros before the first sample)."""
        lags = sorted(self._lags_s)
        if not lags:
            return LoopLag(samples=0, p50_ms=0.0, p99_ms=0.0, max_ms=0.0)

        def percentile(fraction: float) -> float:
            return round(lags[min(len(lags) - 1, int(fraction * len(lags)))] * 1000, 2)

        return LoopLag(
            samples=len(lags),
            p50_ms=percentile(0.50),
            p99_ms=percentile(0.99),
            max_ms=round(lags[-1] * 1000, 2),
        )

    async def _sample(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + self.interval_s
            await asyncio.sleep(self.interval_s)
            self._lags_s.append(max(0.0, loop.time() - due))
