"""Run a call that must reach its end even if the task awaiting it is cancelled meanwhile.

A COMMIT or a connection's close cut short leaves the connection half-way through a
conversation with the server (and a COMMIT cut short on PostgreSQL rolls back the work its unit
finished). :func:`run_to_completion` runs such a call in a task of its own that refuses to be
cancelled, and awaits it directly (a wake-up as cheap as awaiting the call itself, where
``asyncio.shield`` costs two more turns of the loop while the connection is held: 4 % of
PostgreSQL's ``create_message`` under load, ``bench/README.md``, finding 50).

Cancellations come in two kinds, and both wait for the call: asyncio's ``Task.cancel()`` (and
``asyncio.timeout``) marks the awaiting task, which gets its ``CancelledError`` once the call
is over; an anyio cancel scope (Starlette's, anyio-based middleware's) would cancel again on
every turn of the loop until the task is done, a busy loop for the call's duration, so once
anyio is in use the call is awaited in a shielded anyio scope, which anyio's re-cancelling
skips (3 µs). The event loop shutting down (``asyncio.run``) waits for the call as well.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["run_to_completion"]

ResultT = TypeVar("ResultT")


class _RefusesCancellation(asyncio.Task[ResultT]):
    """A task whose ``cancel()`` does nothing: a task awaiting it is marked cancelled instead
    (asyncio's ``Task.cancel`` falls back to that when the awaited future refuses), and gets its
    ``CancelledError`` once this task is done."""

    def cancel(self, msg: Any | None = None) -> bool:
        return False


async def run_to_completion(call: Coroutine[Any, Any, ResultT]) -> ResultT:
    """``call``'s result; if the awaiting task is cancelled meanwhile, ``call`` runs on to its
    end first.

    Raises:
        asyncio.CancelledError: the awaiting task was cancelled, and ``call`` has ended (if it
            failed, its error is the cancellation's ``__cause__``).
        Exception: ``call``'s own error, when nothing was cancelled.
    """
    running = _RefusesCancellation(call, loop=asyncio.get_running_loop())
    anyio = sys.modules.get("anyio")
    try:
        if anyio is None:
            return await running
        with anyio.CancelScope(shield=True):
            return await running
    except asyncio.CancelledError as cancelled:
        if not running.done():
            # Not expected (the task is only woken once ``running`` is done); never leave it
            # running behind the unit's back.
            await asyncio.wait((running,))
        error = None if running.cancelled() else running.exception()  # retrieved either way
        if error is not None:
            raise cancelled from error
        raise
