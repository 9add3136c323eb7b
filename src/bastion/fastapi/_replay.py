"""The server's ``receive`` with messages read ahead, for middlewares that hold requests back:
they read a body before a request waits, or look whether its client left while it waited."""

from __future__ import annotations

import contextlib
from collections import deque
from typing import cast

from starlette.types import Message, Receive

__all__ = ["Replay"]


class Replay:
    """The server's ``receive``, with messages read ahead handed to the app first."""

    __slots__ = ("_read", "_receive")

    def __init__(self, receive: Receive) -> None:
        self._read: deque[Message] = deque()
        self._receive = receive

    async def __call__(self) -> Message:
        if self._read:
            return self._read.popleft()
        return await self._receive()

    async def read_body(self, max_bytes: int) -> None:
        """Read the request's body ahead, up to ``max_bytes`` or until the client goes."""
        size = 0
        while size <= max_bytes:
            message = await self._receive()
            self._read.append(message)
            if message["type"] != "http.request" or not message.get("more_body", False):
                return
            size += len(message.get("body", b""))

    @property
    def holds_messages(self) -> bool:
        """Whether messages read ahead wait to be handed to the app."""
        return bool(self._read)

    def client_gone(self) -> bool:
        """Whether the server already knows the client disconnected, asked without waiting;
        what is read on the way (a bodiless request's empty ``http.request``) is kept."""
        # At most two looks: a request's last body message not read yet, then the disconnect.
        for _ in range(2):
            if self._read:
                last = self._read[-1]
                if last["type"] == "http.disconnect":
                    return True
                if last["type"] != "http.request" or last.get("more_body", False):
                    return False  # the rest of the body comes first: nothing to see past it
            message = _receive_at_once(self._receive)
            if message is None:
                return False
            self._read.append(message)
        return bool(self._read[-1]["type"] == "http.disconnect")


def _receive_at_once(receive: Receive) -> Message | None:
    """The server's next message if it has one ready, else ``None``.

    The receive coroutine is stepped once by hand, as a task would step it: if it finishes,
    its message was ready; if it waits, it is closed there, and its wait is undone by its own
    cleanup (``Event.wait`` and ``Queue.get`` remove their waiter). Starlette's
    ``Request.is_disconnected`` gets the same answer by cancelling the wait in an anyio cancel
    scope, which costs a turn of the event loop: under load, 13 % of the PostgreSQL point
    read's throughput here, where nearly every request waits.
    """
    steps = receive().__await__()
    try:
        steps.send(None)
    except StopIteration as finished:
        return cast("Message", finished.value)
    # RuntimeError: it awaited again while closing; it is left to the garbage collector.
    with contextlib.suppress(RuntimeError):
        steps.close()
    return None
