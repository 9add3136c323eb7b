"""Run a call that must reach its end even if the task awaiting it is cancelled meanwhile.

A COMMIT or a connection's close cut short leaves the connection half-way through a
conversation with the server (and a COMMIT cut short on PostgreSQL rolls back the work its unit
finished). :func:`run_to_completion` runs such a call in a task of its own, which settles an
outcome that refuses to be cancelled, and the awaiting task awaits that outcome.

* A cancellation of the awaiting task (``Task.cancel()``, ``asyncio.timeout``) then marks it
  instead (asyncio's ``Task.cancel`` falls back to that when the awaited future refuses), and it
  gets its ``CancelledError`` once the call is over.
* An anyio cancel scope (Starlette's, anyio-based middleware's) would cancel again on every turn
  of the loop until the task is done, a busy loop for the call's duration; once anyio is in
  use the outcome is awaited in a shielded anyio scope, which anyio's re-cancelling skips
  (3-5 µs).
* The call's own task stays an ordinary one, so deadlines inside the call (asyncpg's
  ``command_timeout`` on a close) still cancel it, and an event loop shutting down cancels it
  like any other task.

It costs a task and one turn of the loop at each end (the call starts at the next turn, and the
awaiting task wakes one turn after the call ends); ``asyncio.shield`` costs a second turn at the
end, during which the unit still holds its connection: 4 % of PostgreSQL's ``create_message``
under load (``bench/README.md``, finding 50).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["run_to_completion"]

ResultT = TypeVar("ResultT")


class _Outcome(asyncio.Future[ResultT]):
    """A call's outcome, which a cancellation of the task awaiting it cannot cancel."""

    def cancel(self, msg: Any | None = None) -> bool:
        return False


async def _settle(call: Coroutine[Any, Any, ResultT], outcome: _Outcome[ResultT]) -> None:
    """Run ``call`` and put its result or error in ``outcome`` (the awaiting task reads it)."""
    try:
        result = await call
    except BaseException as exc:
        outcome.set_exception(exc)
        if not isinstance(exc, Exception | asyncio.CancelledError):
            raise  # KeyboardInterrupt, SystemExit: the loop's to handle too
    else:
        outcome.set_result(result)


async def run_to_completion(call: Coroutine[Any, Any, ResultT], *, name: str) -> ResultT:
    """``call``'s result; if the awaiting task is cancelled meanwhile, ``call`` runs on to its
    end first. ``name`` names the call's task (``asyncio.all_tasks()``, task dumps).

    Raises:
        asyncio.CancelledError: the awaiting task was cancelled, and ``call`` has ended (if it
            failed, its error is the cancellation's ``__cause__``); or ``call``'s own task was
            cancelled (the event loop shutting down).
        Exception: ``call``'s own error, when nothing was cancelled.
    """
    loop = asyncio.get_running_loop()
    outcome: _Outcome[ResultT] = _Outcome(loop=loop)
    anyio = sys.modules.get("anyio")
    shielded = contextlib.nullcontext() if anyio is None else anyio.CancelScope(shield=True)
    with shielded:
        # Made inside the scope: nothing between the task's start and the await can fail.
        running = loop.create_task(_settle(call, outcome), name=name)
        try:
            return await outcome
        except asyncio.CancelledError as cancelled:
            if not outcome.done():  # not expected: nothing but the outcome wakes this task
                # Never leave the call using the connection while the unit's exit closes it.
                running.cancel()
                raise
            error = outcome.exception()  # the call has ended
            if error is None or error is cancelled:
                raise  # the call succeeded, or its own task was cancelled
            raise cancelled from error
