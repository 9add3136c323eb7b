"""``PostgresHub``: live updates across processes over PostgreSQL ``LISTEN``/``NOTIFY``.

For services on PostgreSQL without Redis. Each process keeps one dedicated asyncpg connection,
outside the Database's pool (a pooled connection would be handed to other units and lose the
``LISTEN``); it listens on one channel and publishes on it too (``pg_notify`` in autocommit,
so the notification goes out at once). PostgreSQL delivers notifications in the order their
transactions committed, and caps a payload at 8,000 bytes: :attr:`max_payload_bytes` leaves
room for the envelope (the channel; the payload goes out unescaped). When the connection
drops, every subscription ends with :class:`~bastion.live.LiveUnavailableError` and the hub
reconnects at the next subscribe.

Publishes that arrive while a ``pg_notify`` is on its way wait for it together and then go out
as one statement (``pg_notify`` over an array, in the order they were published), so a busy
process sends one round trip per batch instead of one per event, and no publisher waits
behind a queue of single statements. PostgreSQL folds identical notifications of one
transaction into one: a batch never holds the same payload twice. When the server refuses a
batch, its notifications go again one at a time, so only a publisher whose own notification
is refused hears of it.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Final

import asyncpg  # type: ignore[import-untyped]
from sqlalchemy.engine import URL

from bastion.live.base import DEFAULT_QUEUE_SIZE, check_size
from bastion.live.subscription import (
    Fanout,
    HubClosedError,
    LiveUnavailableError,
    Subscription,
)

__all__ = ["PostgresHub"]

logger = logging.getLogger("bastion.live")

_ERRORS: Final = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    OSError,
    TimeoutError,
)
_NOTIFY: Final = "SELECT pg_notify($1, $2)"
# pg_notify is volatile, so PostgreSQL evaluates it after the ORDER BY: in array order.
_NOTIFY_EACH: Final = (
    "SELECT pg_notify($1, envelope) FROM unnest($2::text[]) WITH ORDINALITY AS t(envelope, n) "
    "ORDER BY n"
)
_BATCH_LIMIT: Final = 200
"""At most this many notifications per statement (at most 7,000 bytes each)."""


class PostgresHub:
    """A :class:`~bastion.live.Hub` on PostgreSQL notifications; connects at first use.

    ``url``: the Database's URL (``database.settings.url``); ``pg_channel``: the notification
    channel (an identifier; one per service sharing a database).
    """

    max_payload_bytes = 7_000

    def __init__(
        self,
        url: URL,
        *,
        pg_channel: str = "bastion_live",
        queue_size: int = DEFAULT_QUEUE_SIZE,
        timeout_s: float = 5.0,
    ) -> None:
        if not pg_channel.isidentifier() or len(pg_channel) > 63:
            raise ValueError("pg_channel must be an identifier of at most 63 characters")
        self._dsn = url.set(drivername="postgresql").render_as_string(hide_password=False)
        self._pg_channel = pg_channel
        self._timeout_s = timeout_s
        self._fanout = Fanout(queue_size)
        self._connection: asyncpg.Connection[Any] | None = None
        self._lock = asyncio.Lock()  # one statement at a time on the connection
        self._waiting: list[tuple[str, asyncio.Future[None]]] = []
        self._sender: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def subscribers(self) -> int:
        """Subscriptions open in this process."""
        return len(self._fanout)

    async def publish(self, channel: str, payload: str) -> None:
        """See :meth:`bastion.live.Hub.publish`.

        Raises:
            ValueError: a payload over :attr:`max_payload_bytes`, or with a NUL character
                (PostgreSQL's text cannot hold one).
            LiveUnavailableError: PostgreSQL is unreachable or refused the notification.
            HubClosedError: the hub is closed.
        """
        if self._closed:
            raise HubClosedError("the live-update hub is closed")
        check_size(payload, self.max_payload_bytes)
        if "\x00" in payload:  # (the channel goes JSON-escaped: a NUL there is fine)
            raise ValueError("a PostgreSQL notification cannot carry a NUL character")
        # The channel as JSON, a newline, the payload as it is: escaping the payload (JSON in
        # JSON) could grow it by half and past PostgreSQL's 8,000 bytes.
        envelope = json.dumps(channel) + "\n" + payload
        sent: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        sent.add_done_callback(_retrieve_error)  # its publisher may be cancelled meanwhile
        self._waiting.append((envelope, sent))
        # The statements go out from a task of their own: a publisher cancelled mid-NOTIFY
        # (its client hung up) must not leave the shared connection half-way through one,
        # where the next publisher would meet asyncpg's "another operation is in progress".
        if self._sender is None or self._sender.done():
            self._sender = asyncio.ensure_future(self._send_waiting())
            self._sender.add_done_callback(_retrieve_error)
        try:
            await asyncio.shield(sent)
        except _ERRORS as exc:
            message = "cannot publish: PostgreSQL is unreachable or refused the notification"
            raise LiveUnavailableError(message) from exc

    async def _send_waiting(self) -> None:
        """Send what publishers wait for, a batch per statement, until none is left."""
        while self._waiting:
            batch = self._next_batch()
            try:
                await self._send(batch)
            except BaseException:  # the loop is shutting down: nothing more goes out
                _settle(batch + self._waiting, HubClosedError("the live-update hub is closed"))
                self._waiting.clear()
                raise

    async def _send(self, batch: list[tuple[str, asyncio.Future[None]]]) -> None:
        """Send ``batch`` in one statement and tell each publisher how it went."""
        try:
            await self._notify([envelope for envelope, _ in batch])
        except asyncpg.PostgresError as exc:
            if len(batch) == 1:
                _settle(batch, exc)
                return
            # The server refused the statement, perhaps for one payload it cannot take (a
            # NUL character): one at a time, so only that publisher hears of it.
            for publish in batch:
                await self._send([publish])
        except Exception as exc:
            _settle(batch, exc)  # the next batch tries again (and reconnects)
        else:
            _settle(batch, None)

    def _next_batch(self) -> list[tuple[str, asyncio.Future[None]]]:
        """The oldest waiting publishes, up to the first repeated payload (PostgreSQL would
        deliver a payload repeated in one transaction only once)."""
        seen: set[str] = set()
        size = 0
        for envelope, _ in self._waiting:
            if envelope in seen or size == _BATCH_LIMIT:
                break
            seen.add(envelope)
            size += 1
        batch, self._waiting = self._waiting[:size], self._waiting[size:]
        return batch

    async def _notify(self, envelopes: list[str]) -> None:
        connection = await self._connect()
        async with self._lock:
            try:
                if len(envelopes) == 1:
                    await connection.execute(
                        _NOTIFY, self._pg_channel, envelopes[0], timeout=self._timeout_s
                    )
                else:
                    await connection.execute(
                        _NOTIFY_EACH, self._pg_channel, envelopes, timeout=self._timeout_s
                    )
            except (asyncpg.InternalClientError, TimeoutError):
                # The connection's protocol state is unknown: drop it (subscriptions end with
                # LiveUnavailableError and clients catch up); the next use reconnects.
                connection.terminate()
                raise

    async def subscribe(self, channel: str) -> Subscription:
        """See :meth:`bastion.live.Hub.subscribe`."""
        if self._closed:
            raise HubClosedError("the live-update hub is closed")
        try:
            await self._connect()
        except _ERRORS as exc:
            raise LiveUnavailableError("live updates are unavailable") from exc
        return self._fanout.add(channel)

    async def _connect(self) -> asyncpg.Connection[Any]:
        async with self._lock:
            connection = self._connection
            if connection is not None and not connection.is_closed():
                return connection  # while closing too: what was published before goes out
            if self._closed:
                raise HubClosedError("the live-update hub is closed")
            connection = await asyncpg.connect(self._dsn, timeout=self._timeout_s)
            # Each pg_notify in autocommit is a transaction of its own, and its COMMIT would
            # wait for a WAL flush: publishes, serialised on this one connection, then capped
            # message creation at about one flush each. A notification is not durable anyway
            # (only listeners connected now ever see it), so the flush buys nothing.
            await connection.execute("SET synchronous_commit TO off")
            connection.add_termination_listener(self._lost)
            await connection.add_listener(self._pg_channel, self._received)
            self._connection = connection
            return connection

    def _received(self, _connection: Any, _pid: int, _channel: str, envelope: str) -> None:
        head, newline, payload = envelope.partition("\n")  # JSON text has no raw newline
        try:
            channel = json.loads(head)
        except ValueError:
            channel = None
        if not newline or not isinstance(channel, str):
            logger.warning("live: ignored a notification that is not ours")
            return
        self._fanout.deliver(channel, payload)

    def _lost(self, _connection: Any) -> None:
        if not self._closed:
            logger.warning("live: PostgreSQL listener connection lost")
        self._connection = None
        self._fanout.end_all(LiveUnavailableError("live updates interrupted"))

    def interrupt(self, channel: str) -> None:
        """See :meth:`bastion.live.Hub.interrupt`."""
        self._fanout.end_channel(channel, LiveUnavailableError("live updates interrupted"))

    async def close(self) -> None:
        """See :meth:`bastion.live.Hub.close`.

        Notifications published before the call still go out (within ``timeout_s``), so a
        shutdown does not drop what committed writes announced just before it.
        """
        self._closed = True
        self._fanout.end_all(HubClosedError("the live-update hub is closed"))
        sender = self._sender
        if sender is not None and not sender.done():
            await asyncio.wait([sender], timeout=self._timeout_s)  # never cancels the sender
        connection, self._connection = self._connection, None
        if connection is not None and not connection.is_closed():
            try:
                await asyncio.wait_for(connection.close(), self._timeout_s)
            except (*_ERRORS, asyncio.CancelledError):
                connection.terminate()
                raise


def _settle(publishes: list[tuple[str, asyncio.Future[None]]], error: Exception | None) -> None:
    """Tell the publishers of ``publishes`` that their notifications went out, or ``error``."""
    for _, sent in publishes:
        if sent.done():
            continue
        if error is None:
            sent.set_result(None)
        else:
            sent.set_exception(error)


def _retrieve_error(task: asyncio.Future[None]) -> None:
    """Mark the error of a publisher's future, or of the sender task, as seen: nobody may be
    awaiting it any more (a publisher cancelled meanwhile)."""
    if not task.cancelled():
        task.exception()
