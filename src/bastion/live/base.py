"""The :class:`Hub` protocol and :class:`LocalHub`, the hub of a single process."""

from __future__ import annotations

from typing import Final, Protocol

from bastion.live.subscription import Fanout, HubClosedError, LiveUnavailableError, Subscription

__all__ = ["DEFAULT_QUEUE_SIZE", "Hub", "LocalHub"]

DEFAULT_QUEUE_SIZE: Final = 256


class Hub(Protocol):
    """Publish/subscribe of small text events (JSON) between the processes of a service.

    A subscriber receives each event published after :meth:`subscribe` returned, once, in
    the order the hub received them, until its subscription ends.
    """

    max_payload_bytes: int
    """Events larger than this cannot be published (send a reference instead)."""

    async def publish(self, channel: str, payload: str) -> None:
        """Send ``payload`` to every subscriber of ``channel``, in every process.

        Raises:
            LiveUnavailableError: the hub cannot reach its transport now.
            ValueError: ``payload`` is larger than :attr:`max_payload_bytes`.
        """
        ...

    async def subscribe(self, channel: str) -> Subscription:
        """Start receiving ``channel``'s events.

        Raises:
            LiveUnavailableError: the hub cannot reach its transport now.
            HubClosedError: the hub was closed.
        """
        ...

    def interrupt(self, channel: str) -> None:
        """End this process's subscriptions of ``channel`` with :class:`LiveUnavailableError`.

        For a publisher whose events could not all be sent: those subscribers missed some and
        must catch up (a stream client reconnects and reads from its cursor).
        """
        ...

    async def close(self) -> None:
        """End every subscription (:class:`HubClosedError`) and release connections."""
        ...


class LocalHub:
    """Events within this process only: for one worker on SQLite (or tests)."""

    max_payload_bytes = 16 * 1024 * 1024

    def __init__(self, *, queue_size: int = DEFAULT_QUEUE_SIZE) -> None:
        self._fanout = Fanout(queue_size)
        self._closed = False

    @property
    def subscribers(self) -> int:
        """Subscriptions open in this process."""
        return len(self._fanout)

    async def publish(self, channel: str, payload: str) -> None:
        check_size(payload, self.max_payload_bytes)
        self._fanout.deliver(channel, payload)

    async def subscribe(self, channel: str) -> Subscription:
        if self._closed:
            raise HubClosedError("the live-update hub is closed")
        return self._fanout.add(channel)

    def interrupt(self, channel: str) -> None:
        self._fanout.end_channel(channel, LiveUnavailableError("live updates interrupted"))

    async def close(self) -> None:
        self._closed = True
        self._fanout.end_all(HubClosedError("the live-update hub is closed"))


def check_size(payload: str, limit: int) -> None:
    """Raises ValueError when ``payload`` is over ``limit`` bytes of UTF-8."""
    size = len(payload.encode())
    if size > limit:
        raise ValueError(f"event of {size} bytes is over this hub's limit of {limit}")
