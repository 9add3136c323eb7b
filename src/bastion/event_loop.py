"""uvloop that accepts every waiting connection in one turn, as asyncio's loop does.

uvloop runs on libuv, and since libuv 1.45 ("unix: don't accept() connections in a loop",
libuv/libuv#3696) a listening socket gets one ``accept`` per turn of the loop. A turn of a
busy server lasts milliseconds, so clients that connect while it is busy wait in the kernel's
accept queue, one turn each, and that wait is part of their first request's latency: with the
reference service under 1,000 new connections, the last was accepted 3 s after the first
(bench/README.md, finding 31). asyncio's own loop accepts up to the backlog in one turn.

:class:`BatchAcceptingLoop` is uvloop with its ``create_server`` (TCP) and
``create_unix_server`` (uvicorn's ``--uds``) replaced: the listening socket is watched with
``add_reader``, every readiness accepts until the queue is empty (at most ``backlog`` at a
time), and each accepted socket is handed to uvloop's ``connect_accepted_socket``, so the
connections themselves are uvloop's transports.

Serve with it by naming the factory as uvicorn's loop::

    uvicorn conversations.app:create_app --factory --loop bastion.event_loop:new_event_loop

Needs uvloop (``pip install uvloop``, part of ``uvicorn[standard]``); importing this module
without it raises :class:`ImportError` with that hint.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import ssl as ssl_module
import stat
from asyncio.trsock import TransportSocket
from collections.abc import Callable, Iterable, Sequence
from typing import Any

try:
    import uvloop
except ImportError as exc:  # pragma: no cover - uvloop is part of the service extra
    raise ImportError(
        "bastion.event_loop needs uvloop: pip install uvloop (or uvicorn[standard])"
    ) from exc

__all__ = ["BatchAcceptingLoop", "BatchAcceptingServer", "new_event_loop"]

logger = logging.getLogger("bastion.event_loop")

ProtocolFactory = Callable[[], asyncio.BaseProtocol]

# Out of file descriptors or kernel memory: accepting again at once would fail again and spin
# the loop, so the listener pauses for a second, as asyncio's loop does. Any other error but
# a client's own (below) pauses it too, and is reported.
_RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# The client went away, or a firewall refused it, before its connection was accepted: that
# connection is gone, the next one may be fine.
_CLIENT_ERRORS = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM})
ACCEPT_RETRY_DELAY_S = 1.0


class BatchAcceptingServer(asyncio.AbstractServer):
    """A TCP or Unix-socket server on uvloop that accepts every waiting connection per readiness.

    Made by :meth:`BatchAcceptingLoop.create_server` and
    :meth:`~BatchAcceptingLoop.create_unix_server`; it behaves as asyncio's ``Server`` does:
    ``close()`` stops accepting and closes the listening sockets (connections already set up
    stay open; those still being set up, such as TLS handshakes, are dropped), and
    ``wait_closed()`` returns once the server is closed and nothing is being set up.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        listeners: Sequence[socket.socket],
        protocol_factory: ProtocolFactory,
        backlog: int,
        ssl: ssl_module.SSLContext | None,
        ssl_handshake_timeout: float | None,
        ssl_shutdown_timeout: float | None,
    ) -> None:
        self._loop = loop
        self._listeners = list(listeners)
        self._protocol_factory = protocol_factory
        # At least one accept per readiness, or a readable listener would spin the loop.
        self._accepts_per_turn = max(1, backlog)
        self._backlog = backlog
        self._ssl = ssl
        self._ssl_timeouts: dict[str, float] = {}
        if ssl_handshake_timeout is not None:
            self._ssl_timeouts["ssl_handshake_timeout"] = ssl_handshake_timeout
        if ssl_shutdown_timeout is not None:
            self._ssl_timeouts["ssl_shutdown_timeout"] = ssl_shutdown_timeout
        self._serving = False
        self._closed: asyncio.Future[None] = loop.create_future()
        # Descriptors with a reader on them, kept as numbers: a listening socket closed by
        # someone else has fileno() -1, and its reader must still be removed.
        self._watched: set[int] = set()
        self._handing_over: set[asyncio.Task[None]] = set()
        self._serving_forever: asyncio.Future[None] | None = None

    @property
    def sockets(self) -> tuple[TransportSocket, ...]:
        """The listening sockets, wrapped as asyncio wraps them (empty once closed)."""
        if self._closed.done():
            return ()
        return tuple(TransportSocket(listener) for listener in self._listeners)

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def is_serving(self) -> bool:
        return self._serving

    async def start_serving(self) -> None:
        """Start accepting (a second call does nothing).

        Raises:
            RuntimeError: the server was closed.
            OSError: a socket could not listen; the server is then closed.
        """
        self._start()

    async def serve_forever(self) -> None:
        """Accept until the server is closed or this call is cancelled (then it closes).

        Raises:
            RuntimeError: the server was closed, or another ``serve_forever`` is running.
        """
        if self._serving_forever is not None:
            raise RuntimeError("serve_forever is already running")
        self._start()
        self._serving_forever = self._loop.create_future()
        try:
            await self._serving_forever
        except asyncio.CancelledError:
            self.close()
            await self.wait_closed()
            raise
        finally:
            self._serving_forever = None

    def close(self) -> None:
        """Stop accepting, close the listening sockets and drop connections not yet set up."""
        if self._closed.done():
            return
        self._closed.set_result(None)
        self._serving = False
        for fd in self._watched:
            self._loop.remove_reader(fd)
        self._watched.clear()
        for listener in self._listeners:
            listener.close()
        # A TLS handshake can take up to its timeout (60 s by default); a server shutting
        # down does not wait for it.
        for task in self._handing_over:
            task.cancel()
        if self._serving_forever is not None and not self._serving_forever.done():
            self._serving_forever.cancel()

    async def wait_closed(self) -> None:
        """Wait until the server is closed and no accepted connection is still being set up.

        It does not wait for open connections to end: uvicorn waits for them itself.
        """
        await asyncio.shield(self._closed)
        while self._handing_over:
            await asyncio.wait(set(self._handing_over))

    def _start(self) -> None:
        if self._closed.done():
            raise RuntimeError("the server is closed")
        if self._serving:
            return
        self._serving = True
        try:
            for listener in self._listeners:
                listener.listen(self._backlog)
                self._watch(listener)
        except BaseException:
            self.close()
            raise

    def _watch(self, listener: socket.socket) -> None:
        fd = listener.fileno()
        self._loop.add_reader(fd, self._accept_waiting, listener, fd)
        self._watched.add(fd)

    def _accept_waiting(self, listener: socket.socket, fd: int) -> None:
        """Accept what the queue holds, up to ``backlog`` connections, in this turn."""
        for _ in range(self._accepts_per_turn):
            try:
                connection, _address = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:
                if error.errno in _CLIENT_ERRORS:
                    continue
                self._pause(listener, fd, error)
                return
            self._hand_over(connection)

    def _pause(self, listener: socket.socket, fd: int, error: OSError) -> None:
        if error.errno in _RESOURCE_ERRORS:
            logger.error(
                "accepting a connection failed (%s); accepting again in %.0f s",
                error.strerror,
                ACCEPT_RETRY_DELAY_S,
            )
        else:
            self._loop.call_exception_handler(
                {
                    "message": f"accepting a connection failed; accepting again in "
                    f"{ACCEPT_RETRY_DELAY_S:.0f} s",
                    "exception": error,
                    "socket": TransportSocket(listener),
                }
            )
        self._loop.remove_reader(fd)
        self._watched.discard(fd)
        self._loop.call_later(ACCEPT_RETRY_DELAY_S, self._resume, listener)

    def _resume(self, listener: socket.socket) -> None:
        if self._serving:
            self._watch(listener)

    def _hand_over(self, connection: socket.socket) -> None:
        connection.setblocking(False)
        task = self._loop.create_task(self._connect(connection))
        self._handing_over.add(task)
        task.add_done_callback(self._handing_over.discard)

        def close_if_cancelled(task: asyncio.Task[None]) -> None:
            # Cancelled before uvloop took the socket, nothing else would close it; after,
            # uvloop has detached it and this close does nothing.
            if task.cancelled():
                connection.close()

        task.add_done_callback(close_if_cancelled)

    async def _connect(self, connection: socket.socket) -> None:
        try:
            await self._loop.connect_accepted_socket(
                self._protocol_factory,
                connection,
                ssl=self._ssl,
                **self._ssl_timeouts,
            )
        except OSError as error:
            # A client that reset, a TLS handshake that failed or timed out (all OSErrors):
            # that one connection is gone, and the server goes on. uvloop has closed the
            # socket if it had taken it; if not, this closes it.
            logger.debug("an accepted connection could not be set up: %r", error)
            connection.close()
        except Exception as error:
            # The protocol factory or uvloop failed: a bug to report, not a client's doing.
            self._loop.call_exception_handler(
                {
                    "message": "setting up an accepted connection failed",
                    "exception": error,
                    "socket": TransportSocket(connection),
                }
            )
            connection.close()


class BatchAcceptingLoop(uvloop.Loop):
    """uvloop whose TCP and Unix-socket servers accept every waiting connection per turn
    (module docstring)."""

    async def create_server(  # type: ignore[override]
        self,
        protocol_factory: ProtocolFactory,
        host: str | Sequence[str] | None = None,
        port: int | None = None,
        *,
        family: int = socket.AF_UNSPEC,
        flags: int = socket.AI_PASSIVE,
        sock: socket.socket | None = None,
        backlog: int = 100,
        ssl: ssl_module.SSLContext | None = None,
        reuse_address: bool | None = None,
        reuse_port: bool | None = None,
        ssl_handshake_timeout: float | None = None,
        ssl_shutdown_timeout: float | None = None,
        start_serving: bool = True,
    ) -> BatchAcceptingServer:
        """Bind (or take ``sock``) and serve, as ``loop.create_server`` does.

        Raises:
            ValueError: both ``sock`` and ``host``/``port`` given, or neither; TLS timeouts
                without ``ssl``.
            TypeError: ``ssl`` is not an :class:`ssl.SSLContext`.
            OSError: an address could not be bound (the message names it).
        """
        _check_tls(ssl, ssl_handshake_timeout, ssl_shutdown_timeout)
        if host == "":
            host = None  # all interfaces, as asyncio and uvloop read it
        if sock is not None:
            if host is not None or port is not None:
                raise ValueError("host/port and sock can not be specified at the same time")
            if sock.type != socket.SOCK_STREAM:
                raise ValueError(f"A Stream Socket was expected, got {sock!r}")
            listeners = [sock]
        elif host is None and port is None:
            raise ValueError("Neither host/port nor sock were specified")
        else:
            listeners = await self._bind(host, port, family, flags, reuse_address, reuse_port)
        return await self._serve(
            listeners,
            protocol_factory,
            backlog,
            ssl,
            ssl_handshake_timeout,
            ssl_shutdown_timeout,
            start_serving,
        )

    async def create_unix_server(  # type: ignore[override]
        self,
        protocol_factory: ProtocolFactory,
        path: str | os.PathLike[str] | None = None,
        *,
        sock: socket.socket | None = None,
        backlog: int = 100,
        ssl: ssl_module.SSLContext | None = None,
        ssl_handshake_timeout: float | None = None,
        ssl_shutdown_timeout: float | None = None,
        start_serving: bool = True,
    ) -> BatchAcceptingServer:
        """Bind the Unix socket ``path`` (or take ``sock``) and serve, as
        ``loop.create_unix_server`` does (uvicorn's ``--uds``).

        A socket file left at ``path`` by a server that is gone is replaced, as asyncio and
        uvloop replace it; any other file there is an error.

        Raises:
            ValueError: both ``path`` and ``sock`` given, or neither; ``sock`` is not a Unix
                stream socket; TLS timeouts without ``ssl``.
            TypeError: ``ssl`` is not an :class:`ssl.SSLContext`.
            OSError: ``path`` could not be bound (the message names it).
        """
        _check_tls(ssl, ssl_handshake_timeout, ssl_shutdown_timeout)
        if sock is not None:
            if path is not None:
                raise ValueError("path and sock can not be specified at the same time")
            if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
                raise ValueError(f"A UNIX Domain Stream Socket was expected, got {sock!r}")
            listener = sock
        elif path is None:
            raise ValueError("path was not specified, and no sock specified")
        else:
            listener = _bind_unix(os.fspath(path))
        return await self._serve(
            [listener],
            protocol_factory,
            backlog,
            ssl,
            ssl_handshake_timeout,
            ssl_shutdown_timeout,
            start_serving,
        )

    async def _serve(
        self,
        listeners: list[socket.socket],
        protocol_factory: ProtocolFactory,
        backlog: int,
        ssl: ssl_module.SSLContext | None,
        ssl_handshake_timeout: float | None,
        ssl_shutdown_timeout: float | None,
        start_serving: bool,
    ) -> BatchAcceptingServer:
        """A :class:`BatchAcceptingServer` on the bound ``listeners``, started if asked."""
        for listener in listeners:
            listener.setblocking(False)
        server = BatchAcceptingServer(
            self,
            listeners,
            protocol_factory,
            backlog,
            ssl,
            ssl_handshake_timeout,
            ssl_shutdown_timeout,
        )
        if start_serving:
            await server.start_serving()
        return server

    async def _bind(
        self,
        host: str | Sequence[str] | None,
        port: int | None,
        family: int,
        flags: int,
        reuse_address: bool | None,
        reuse_port: bool | None,
    ) -> list[socket.socket]:
        """One listening socket per address ``host`` resolves to, as asyncio binds them."""
        hosts: Iterable[str | None] = [host] if host is None or isinstance(host, str) else host
        addresses: list[tuple[Any, ...]] = []
        for one_host in hosts:
            infos = await self.getaddrinfo(
                one_host, port, family=family, type=socket.SOCK_STREAM, flags=flags
            )
            addresses.extend(info for info in infos if info not in addresses)
        listeners: list[socket.socket] = []
        try:
            for address_family, kind, protocol, _name, address in addresses:
                try:
                    listener = socket.socket(address_family, kind, protocol)
                except OSError:
                    # A family the kernel lacks (no IPv6): serve on the others, as uvloop does.
                    continue
                listeners.append(listener)
                if reuse_address is not False:
                    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if reuse_port:
                    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if address_family == socket.AF_INET6:
                    # As asyncio does: a v6 socket serves v6 only, the v4 address has its own.
                    listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                try:
                    listener.bind(address)
                except OSError as error:
                    raise OSError(
                        error.errno,
                        f"error while attempting to bind on address {address!r}: "
                        f"{(error.strerror or str(error)).lower()}",
                    ) from None
            if not listeners:
                raise OSError(f"no address of {host!r} could be served")
        except BaseException:
            for listener in listeners:
                listener.close()
            raise
        return listeners


def _check_tls(
    ssl: ssl_module.SSLContext | None,
    ssl_handshake_timeout: float | None,
    ssl_shutdown_timeout: float | None,
) -> None:
    """Refuse TLS settings asyncio would refuse.

    Raises:
        TypeError: ``ssl`` is not an :class:`ssl.SSLContext`.
        ValueError: TLS timeouts without ``ssl``.
    """
    if ssl is not None and not isinstance(ssl, ssl_module.SSLContext):
        raise TypeError(f"ssl argument must be an SSLContext or None, got {ssl!r}")
    if ssl is None and (ssl_handshake_timeout is not None or ssl_shutdown_timeout is not None):
        raise ValueError("ssl_handshake_timeout and ssl_shutdown_timeout need ssl")


def _bind_unix(path: str) -> socket.socket:
    """A Unix stream socket bound at ``path``, a socket file left there first removed (as
    asyncio and uvloop remove it: a server that is gone leaves its file behind).

    Raises:
        OSError: ``path`` could not be bound (the message names it).
    """
    if not path.startswith("\0"):  # Linux's abstract namespace has no file
        try:
            if stat.S_ISSOCK(os.stat(path).st_mode):
                os.remove(path)
        except FileNotFoundError:
            pass
        except OSError as error:  # as asyncio does: say so, and let bind() give the verdict
            logger.error("could not check or remove the stale socket file %r: %r", path, error)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(path)
    except OSError as error:
        listener.close()
        raise OSError(
            error.errno,
            f"error while attempting to bind on address {path!r}: "
            f"{(error.strerror or str(error)).lower()}",
        ) from None
    return listener


def new_event_loop() -> BatchAcceptingLoop:
    """A new :class:`BatchAcceptingLoop`: the factory to give uvicorn's ``--loop``.

    >>> new_event_loop().run_until_complete(main())  # doctest: +SKIP
    """
    return BatchAcceptingLoop()
