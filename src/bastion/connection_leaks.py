"""The leak detector: connections held longer than ``LEAK_DETECTION_THRESHOLD``, and by whom.

Every checkout is noted with the route, request id and task that took the connection; a
connection still out after the threshold is logged once (``bastion.leaks``) and counted. A
unit of work that never ends — an awaited call that hangs while holding a session, a
forgotten stream — shows up here long before the pool runs dry.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine

from bastion.request_context import current_request

__all__ = ["HeldConnection", "LeakDetector"]

logger = logging.getLogger("bastion.leaks")


@dataclass(slots=True)
class HeldConnection:
    """A connection out of the pool: since when, and who took it."""

    since: float
    route: str
    request_id: str
    task: str
    reported: bool = False


class LeakDetector:
    """Notes checkouts and check-ins; :meth:`scan` reports connections held too long."""

    def __init__(self, threshold_s: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.threshold_s = threshold_s
        self.reported = 0
        self._clock = clock
        self._held: dict[int, HeldConnection] = {}

    def install(self, engines: tuple[AsyncEngine, ...]) -> None:
        """Watch the pools of ``engines``."""
        for engine in engines:
            pool = engine.sync_engine.pool
            event.listen(pool, "checkout", self._on_checkout)
            event.listen(pool, "checkin", self._on_checkin)

    def held(self) -> list[HeldConnection]:
        """Every connection out now, oldest first."""
        return sorted(self._held.values(), key=lambda held: held.since)

    def scan(self) -> list[HeldConnection]:
        """Log and return the connections newly found held past the threshold."""
        now = self._clock()
        found = []
        for held in self._held.values():
            if not held.reported and now - held.since >= self.threshold_s:
                held.reported = True
                self.reported += 1
                found.append(held)
                logger.warning(
                    "connection held for %.1fs (LEAK_DETECTION_THRESHOLD %gs) by route=%s "
                    "request_id=%s task=%s",
                    now - held.since,
                    self.threshold_s,
                    held.route,
                    held.request_id,
                    held.task,
                )
        return found

    def hold(self, record: Any) -> None:
        """Note that the pool connection ``record`` is lent to the running task's unit (the
        pool's checkout event, and :mod:`bastion._warm_connections`' loans)."""
        request = current_request()
        try:
            task = asyncio.current_task()
        except RuntimeError:  # no running loop: a synchronous caller
            task = None
        self._held[id(record)] = HeldConnection(
            since=self._clock(),
            route=request.route if request is not None else "-",
            request_id=request.request_id if request is not None else "-",
            task=task.get_name() if task is not None else "-",
        )

    def release(self, record: Any) -> None:
        """Note that the pool connection ``record`` is no longer lent to a unit."""
        self._held.pop(id(record), None)

    def _on_checkout(self, _dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        self.hold(record)

    def _on_checkin(self, _dbapi_connection: Any, record: Any) -> None:
        self.release(record)
