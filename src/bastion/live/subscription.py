"""A subscriber's bounded queue of events, and the fan-out of one process's subscribers.

Each :class:`Subscription` holds at most ``queue_size`` undelivered events. Delivery never
waits: when the queue is full the subscriber is ended with :class:`SlowConsumerError`
instead of the process buffering without bound for a client that does not read.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Final

from bastion.errors import BastionError

__all__ = [
    "HubClosedError",
    "LiveError",
    "LiveUnavailableError",
    "SlowConsumerError",
    "Subscription",
]


class LiveError(BastionError):
    """A live-update subscription ended before its subscriber left."""

    code = "live_error"


class SlowConsumerError(LiveError):
    """The subscriber fell ``queue_size`` events behind and was disconnected."""

    code = "slow_consumer"


class LiveUnavailableError(LiveError):
    """The hub lost (or cannot get) its connection: events may have been missed."""

    code = "live_unavailable"
    retryable = True


class HubClosedError(LiveError):
    """The hub is shutting down (the process is stopping)."""

    code = "live_closed"


_END: Final = object()


class Subscription:
    """The events of one channel for one subscriber, in the order the hub received them.

    >>> async with await hub.subscribe("conversation:42") as events:  # doctest: +SKIP
    ...     async for payload in events:
    ...         ...

    Iterating raises :class:`SlowConsumerError`, :class:`LiveUnavailableError` or
    :class:`HubClosedError` when the subscription ends for that reason.
    """

    def __init__(
        self, channel: str, queue_size: int, on_close: Callable[[Subscription], None]
    ) -> None:
        self.channel = channel
        self._queue: asyncio.Queue[object] = asyncio.Queue(queue_size + 1)  # + the end marker
        self._limit = queue_size
        self._on_close = on_close
        self.ended = asyncio.Event()
        """Set when the subscription ended (its reason in :attr:`error`)."""
        self.error: LiveError | None = None

    @property
    def pending(self) -> int:
        """Events received and not yet read."""
        return 0 if self.ended.is_set() else self._queue.qsize()

    def deliver(self, payload: str) -> None:
        """Queue ``payload``; end the subscription if the subscriber is too far behind."""
        if self.ended.is_set():
            return
        if self._queue.qsize() >= self._limit:
            self.end(SlowConsumerError(f"more than {self._limit} events behind"))
            return
        self._queue.put_nowait(payload)

    def end(self, error: LiveError | None = None) -> None:
        """End the subscription; the subscriber gets ``error`` (or the end of iteration)."""
        if self.ended.is_set():
            return
        self.error = error
        self.ended.set()
        while not self._queue.empty():  # what it had not read is dropped with it
            self._queue.get_nowait()
        self._queue.put_nowait(_END)
        self._on_close(self)

    async def get(self) -> str:
        """The next event.

        Raises:
            LiveError: the subscription ended: :class:`SlowConsumerError`,
                :class:`LiveUnavailableError`, or :class:`HubClosedError` (also when the
                subscriber closed it).
        """
        item = await self._queue.get()
        if item is _END:
            self._queue.put_nowait(_END)  # later calls end the same way
            raise self.error if self.error is not None else HubClosedError("subscription closed")
        assert isinstance(item, str)
        return item

    async def __aiter__(self) -> AsyncIterator[str]:
        while True:
            try:
                yield await self.get()
            except HubClosedError:
                if self.error is None:  # closed by the subscriber itself
                    return
                raise

    def close(self) -> None:
        """Leave the channel (idempotent)."""
        self.end(None)

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        self.close()


class Fanout:
    """This process's subscribers, by channel."""

    def __init__(self, queue_size: int) -> None:
        if queue_size < 1:
            raise ValueError("queue_size must be at least 1")
        self.queue_size = queue_size
        self._channels: dict[str, set[Subscription]] = {}

    def __len__(self) -> int:
        return sum(len(subscribers) for subscribers in self._channels.values())

    def add(self, channel: str) -> Subscription:
        subscription = Subscription(channel, self.queue_size, self._remove)
        self._channels.setdefault(channel, set()).add(subscription)
        return subscription

    def deliver(self, channel: str, payload: str) -> None:
        for subscription in list(self._channels.get(channel, ())):
            subscription.deliver(payload)

    def end_channel(self, channel: str, error: LiveError) -> None:
        for subscription in list(self._channels.get(channel, ())):
            subscription.end(error)

    def end_all(self, error: LiveError) -> None:
        for subscribers in list(self._channels.values()):
            for subscription in list(subscribers):
                subscription.end(error)

    def _remove(self, subscription: Subscription) -> None:
        subscribers = self._channels.get(subscription.channel)
        if subscribers is not None:
            subscribers.discard(subscription)
            if not subscribers:
                del self._channels[subscription.channel]
