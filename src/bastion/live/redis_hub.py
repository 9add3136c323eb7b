"""``RedisHub``: live updates across processes over Redis pub/sub.

Each process keeps one pub/sub connection, subscribed to the pattern of its prefix, and fans
the events out to its own subscribers; publishing is one ``PUBLISH`` on a pooled connection.
Redis delivers a channel's messages in the order it received them. When the pub/sub
connection drops, every subscription of the process ends with
:class:`~bastion.live.LiveUnavailableError` — their subscribers may have missed events and
must catch up (a WebSocket client reconnects and reads the page it missed) — and the hub
reconnects in the background; :meth:`subscribe` refuses until it has.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from typing import Any, Final

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from bastion.live.base import DEFAULT_QUEUE_SIZE, check_size
from bastion.live.subscription import (
    Fanout,
    HubClosedError,
    LiveUnavailableError,
    Subscription,
)

__all__ = ["RedisHub"]

logger = logging.getLogger("bastion.live")

_ERRORS: Final = (RedisError, OSError, TimeoutError)
_RECONNECT_S: Final = 0.25
_RECONNECT_MAX_S: Final = 5.0
_POLL_S: Final = 1.0
_CONNECT_WAIT_S: Final = 2.0


class RedisHub:
    """A :class:`~bastion.live.Hub` on Redis pub/sub; connects at the first subscribe.

    >>> hub = RedisHub("redis://127.0.0.1:6379/0", prefix="svc:")  # doctest: +SKIP
    """

    max_payload_bytes = 1024 * 1024

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "bastion:",
        queue_size: int = DEFAULT_QUEUE_SIZE,
        timeout_s: float = 1.0,
    ) -> None:
        self._prefix = f"{prefix}live:"
        self._fanout = Fanout(queue_size)
        # No socket timeout on the subscriber connection: it is idle between events.
        self._client: Redis = Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
        )
        self._listener: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        self._closed = False

    @property
    def subscribers(self) -> int:
        """Subscriptions open in this process."""
        return len(self._fanout)

    async def publish(self, channel: str, payload: str) -> None:
        """See :meth:`bastion.live.Hub.publish`."""
        check_size(payload, self.max_payload_bytes)
        try:
            await self._client.publish(self._prefix + channel, payload)
        except _ERRORS as exc:
            raise LiveUnavailableError("cannot publish: Redis is unreachable") from exc

    async def subscribe(self, channel: str) -> Subscription:
        """See :meth:`bastion.live.Hub.subscribe`."""
        if self._closed:
            raise HubClosedError("the live-update hub is closed")
        if self._listener is None or self._listener.done():
            # A listener that ended (it never should: see _listen) is started again.
            self._listener = asyncio.create_task(self._listen(), name="bastion-live-redis")
        if not self._connected.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_CONNECT_WAIT_S):
                    await self._connected.wait()
        if not self._connected.is_set():
            raise LiveUnavailableError("live updates are unavailable: Redis is unreachable")
        return self._fanout.add(channel)

    async def _listen(self) -> None:
        start = len(self._prefix)
        delay = _RECONNECT_S
        while not self._closed:
            pubsub = self._client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.psubscribe(_glob_escape(self._prefix) + "*")
                self._connected.set()
                delay = _RECONNECT_S
                while True:
                    message = await pubsub.get_message(timeout=_POLL_S)
                    if message is None or message.get("type") != "pmessage":
                        continue
                    self._received(message, start)
            except _ERRORS as exc:
                # Once per outage, not once per reconnection attempt.
                log = logger.warning if self._connected.is_set() else logger.debug
                log("live: Redis pub/sub unavailable (%s); reconnecting", type(exc).__name__)
            finally:
                self._connected.clear()
                # Subscribers may have missed events: tell them rather than go silent.
                self._fanout.end_all(LiveUnavailableError("live updates interrupted"))
                with contextlib.suppress(*_ERRORS):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            await asyncio.sleep(delay)
            delay = min(delay * 2, _RECONNECT_MAX_S)

    def _received(self, message: dict[str, Any], start: int) -> None:
        # One bad message (not UTF-8, not bytes…) is skipped: it must not stop the listener,
        # and with it every stream of the process.
        try:
            channel = message["channel"].decode()[start:]
            payload = message["data"].decode()
        except (AttributeError, KeyError, TypeError, UnicodeDecodeError) as exc:
            logger.warning("live: skipped a Redis message that is not ours (%s)",
                           type(exc).__name__)  # fmt: skip
            return
        self._fanout.deliver(channel, payload)

    def interrupt(self, channel: str) -> None:
        """See :meth:`bastion.live.Hub.interrupt`."""
        self._fanout.end_channel(channel, LiveUnavailableError("live updates interrupted"))

    async def close(self) -> None:
        """See :meth:`bastion.live.Hub.close`."""
        self._closed = True
        self._fanout.end_all(HubClosedError("the live-update hub is closed"))
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
        await self._client.aclose()


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)
