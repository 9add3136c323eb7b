"""Wait for a task that must run to its end even if the waiter is cancelled meanwhile.

A COMMIT or a connection's close cut short leaves the connection half-way through a
conversation with the server: Bastion runs such a call in a task of its own and waits for it
here. A cancellation of the waiter does not reach the task; it is raised once the task is over.

Cancellations come in two kinds, and both are held off: asyncio's ``Task.cancel()`` (and
``asyncio.timeout``) cancels once, and the waiter simply waits again; an anyio cancel scope
(Starlette's, anyio-based middleware's) cancels again at every await until its scope is left,
and would make that wait a busy loop, so once anyio is in use the rest of the wait runs in a
shielded anyio scope, which anyio's re-cancelling skips.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from typing import TypeVar

__all__ = ["wait_to_completion"]

ResultT = TypeVar("ResultT")


async def wait_to_completion(task: asyncio.Task[ResultT]) -> ResultT:
    """``task``'s result; if this coroutine is cancelled meanwhile, ``task`` runs on to its end
    first.

    Raises:
        asyncio.CancelledError: this coroutine was cancelled (after ``task`` ended; ``task``'s
            own error, if it failed, is the cancellation's ``__cause__``), or ``task`` itself
            was (the event loop shutting down cancels every task).
        Exception: ``task``'s own error, when nothing was cancelled.
    """
    try:
        # asyncio.shield: a cancellation of this coroutine cancels only the shield's future.
        return await asyncio.shield(task)
    except asyncio.CancelledError as exc:
        cancelled = exc
    anyio = sys.modules.get("anyio")
    if anyio is None:
        await _wait_out(task)
    else:
        with anyio.CancelScope(shield=True):
            await _wait_out(task)
    error = None if task.cancelled() else task.exception()  # retrieved either way
    if error is not None:
        raise cancelled from error
    raise cancelled


async def _wait_out(task: asyncio.Task[ResultT]) -> None:
    while not task.done():
        # A second Task.cancel() (or an anyio scope's, outside a shielded one): still waiting.
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait((task,))
