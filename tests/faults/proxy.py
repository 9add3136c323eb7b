"""A TCP proxy on loopback that injects network faults, on the model of toxiproxy.

Put it between the application and PostgreSQL and switch faults ("toxics") on and off while
the test runs::

    async with FaultProxy("127.0.0.1", server_port) as proxy:
        url = f"postgresql://postgres@{proxy.host}:{proxy.port}/app"
        ...
        proxy.latency(200)                             # every chunk 200 ms late, both ways
        proxy.reset_on(b"COMMIT", forward_first=True)  # COMMIT reaches the server, no reply
        proxy.clear()                                  # back to plain forwarding

Bytes are opaque: the proxy knows nothing of the PostgreSQL protocol, except that
:meth:`FaultProxy.reset_on` looks for a byte pattern in what the client sends. Toxics take
effect at once, on the connections already open as well as on new ones; several can be on
together (latency and slicer, say), and setting a toxic again replaces its earlier setting.

How a connection is taken apart matters to the code under test, so each toxic says which it
does: a *graceful close* sends FIN (the peer reads end-of-file), a *reset* sends RST (the
peer gets ``ConnectionResetError``). The kernel turns a close into a reset by itself when
the proxy still has unread bytes from that peer, so a graceful close can occasionally be
seen as a reset by a peer that was still sending.

Each proxied connection is two transports (client side, server side) and two pipe tasks, one
per direction, that take chunks in arrival order, apply the toxics and write them on. All of
it runs on the event loop that called :meth:`FaultProxy.start`.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import random
import socket
import struct
import termios
from collections import deque
from collections.abc import Coroutine
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, Self

ASYNCPG_COMMIT = b"Q\x00\x00\x00\x0cCOMMIT;\x00"
"""The bytes of the COMMIT that asyncpg sends (and SQLAlchemy's asyncpg dialect, through it):
a simple-query message, type ``Q``, length 12, text ``COMMIT;``. As a :meth:`FaultProxy.reset_on`
pattern it matches that message only, not the word in a query or a parameter value."""

UPSTREAM = "upstream"  # client -> server
DOWNSTREAM = "downstream"  # server -> client
_DIRECTIONS = {
    UPSTREAM: frozenset({UPSTREAM}),
    DOWNSTREAM: frozenset({DOWNSTREAM}),
    "both": frozenset({UPSTREAM, DOWNSTREAM}),
}

# A pipe stops reading from its source while this much is waiting in it (a blackhole or a
# long latency holds data), so the sender's socket buffers fill and it blocks, as it would
# on a stalled network, instead of the proxy buffering without bound.
_HIGH_WATER = 1 << 20
_LOW_WATER = 1 << 18
_CONNECT_TIMEOUT = 5.0
# reset_on(forward_first=True) waits at most this long for the server's kernel to
# acknowledge the forwarded bytes before it resets.
_DELIVERY_TIMEOUT = 1.0

_Close = Literal["graceful", "abort", "reset"]


def _directions(direction: str) -> frozenset[str]:
    try:
        return _DIRECTIONS[direction]
    except KeyError:
        raise ValueError(
            f"direction must be 'upstream', 'downstream' or 'both', not {direction!r}"
        ) from None


@dataclass(eq=False)
class _Latency:
    ms: float
    jitter_ms: float
    directions: frozenset[str]


@dataclass(eq=False)
class _ByteBudget:
    """reset_peer or limit_data: forward ``limit`` bytes in a direction, then end."""

    limit: int
    directions: frozenset[str]
    ending: _Close


@dataclass(eq=False)
class _ResetOn:
    pattern: bytes
    forward_first: bool
    remaining: int


@dataclass(eq=False)
class _Slicer:
    average_size: int
    size_variation: int
    delay_us: int
    directions: frozenset[str]


class FaultProxy:
    """A TCP proxy from ``host:port`` (127.0.0.1, a free port) to the upstream server.

    ``start()`` binds and listens (``port`` is known from then on); ``stop()`` closes every
    connection, waits for the proxy's tasks and sockets to finish and raises if any task
    failed unexpectedly (``errors`` keeps those). ``async with`` does both. The toxic
    methods are synchronous and take effect at once; call them on the event loop's thread.

    The proxy accepts a client before it connects upstream; when the upstream refuses (the
    server is down), the client's connection is reset, where a direct connection would
    have been refused.
    """

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.host = "127.0.0.1"
        self.port = 0
        self.resets_done = 0
        """How many connections :meth:`reset_on` has reset."""
        self.errors: list[BaseException] = []
        """Unexpected failures of the proxy's own tasks (a bug in the proxy, not a fault)."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listener: socket.socket | None = None
        self._listening = False
        self._stopped = False
        self._connections: set[_Connection] = set()
        self._sides: set[_Side] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._changed = asyncio.Event()
        self._count_changed = asyncio.Event()
        self._down = False
        self._blackhole = False
        self._latency: _Latency | None = None
        self._budgets: dict[_Close, _ByteBudget] = {}
        self._reset_on: _ResetOn | None = None
        self._slicer: _Slicer | None = None

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind a free port on 127.0.0.1 and accept connections (unless :meth:`down`)."""
        if self._loop is not None:
            raise RuntimeError("FaultProxy.start() was already called")
        self._loop = asyncio.get_running_loop()
        self._listener = self._bind(0)
        self.port = int(self._listener.getsockname()[1])
        if not self._down:
            self._listen()

    async def stop(self) -> None:
        """Close everything the proxy has open and wait until it is all gone."""
        if self._loop is None or self._stopped:
            return
        self._stopped = True
        self._unlisten()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        for connection in list(self._connections):
            connection.close("abort")
        # Connections closed gracefully earlier may still be flushing to a peer that does
        # not read; abort those too.
        for side in list(self._sides):
            if side.transport is not None:
                side.transport.abort()
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        lost = [side.lost for side in self._sides]
        if lost:
            await asyncio.wait(lost, timeout=5)
        if self.errors:
            raise RuntimeError(f"FaultProxy tasks failed: {self.errors!r}") from self.errors[0]

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()

    @property
    def connection_count(self) -> int:
        """Client connections currently open through the proxy."""
        return len(self._connections)

    async def wait_for_connections(self, count: int, within: float = 5.0) -> None:
        """Wait until exactly ``count`` client connections are open (accepting is async).

        Raises ``TimeoutError`` after ``within`` seconds.
        """
        async with asyncio.timeout(within):
            while self.connection_count != count:
                await self._count_changed.wait()

    # -- toxics ----------------------------------------------------------------------------

    def clear(self) -> None:
        """Remove every toxic and undo :meth:`down`: the proxy forwards normally again.

        Data a blackhole held back is forwarded now, in order.
        """
        self._blackhole = False
        self._latency = None
        self._budgets.clear()
        self._reset_on = None
        self._slicer = None
        self.up()
        self._notify()

    def latency(self, ms: float, jitter_ms: float = 0, direction: str = "both") -> None:
        """Delay every chunk by ``ms`` ± ``jitter_ms`` (uniform) from when it arrived.

        Order within a direction is kept: a chunk never overtakes an earlier one, so with
        jitter a chunk may wait a little longer than its own delay.
        """
        if ms < 0 or jitter_ms < 0:
            raise ValueError("latency and jitter must not be negative")
        self._latency = _Latency(float(ms), float(jitter_ms), _directions(direction))
        self._notify()

    def down(self) -> None:
        """Take the proxy down, like toxiproxy's "disabled".

        Every open connection is closed gracefully, and new connections are refused at once
        (ECONNREFUSED: the port stays bound, so nothing else can take it, but nothing
        listens on it).
        """
        self._down = True
        self._unlisten()
        for connection in list(self._connections):
            connection.close("graceful")
        self._notify()

    def up(self) -> None:
        """Undo :meth:`down`: accept connections again (toxics stay as they are)."""
        self._down = False
        if self._loop is not None and not self._stopped and not self._listening:
            self._listen()

    def blackhole(self) -> None:
        """Forward nothing in either direction and never close (toxiproxy "timeout", 0).

        Open connections stay open and new ones are accepted (and connected upstream), but
        no byte goes through: it is held, as in a network partition where nobody hears of a
        failure. When the blackhole is lifted (:meth:`clear`), held data flows on in order.
        """
        self._blackhole = True
        self._notify()

    def reset_peer(self, after_bytes: int = 0, direction: str = "downstream") -> None:
        """Reset connections (TCP RST, both sides) after ``after_bytes`` more bytes.

        Counted per connection and direction from now on (or from the connection's start).
        The reset happens when data arrives: the chunk that reaches ``after_bytes`` is
        forwarded up to that count and then both sides get an RST. With the default (0,
        downstream) a connection dies as soon as the server answers anything, i.e. in the
        middle of the next query on it; idle connections are untouched until then.
        """
        if after_bytes < 0:
            raise ValueError("after_bytes must not be negative")
        self._budgets["reset"] = _ByteBudget(after_bytes, _directions(direction), "reset")
        self._notify()

    def reset_on(self, pattern: bytes, *, forward_first: bool, times: int = 1) -> None:
        """Reset (RST) the connection whose client sends ``pattern``; ``times`` times.

        With ``forward_first=False`` the chunk holding the pattern is dropped and the
        connection reset: the server never sees it. With ``forward_first=True`` the chunk is
        forwarded, the proxy waits until the server's kernel has acknowledged it (so the
        server will read it) and then resets: the server sees the statement, the client
        never gets the reply (replies are held back from the moment of the match).

        The match is a substring test on what the client sends, chunk by chunk, plus the
        last ``len(pattern) - 1`` bytes before the chunk, so a pattern split over two chunks
        is found too (when ``forward_first=False`` the server then has seen its beginning,
        as an incomplete message). It does not parse the protocol: a pattern that occurs in
        a parameter value or a query text matches as well. asyncpg sends ``COMMIT;`` as a
        simple-query message, so ``b"COMMIT"`` catches commits, and :data:`ASYNCPG_COMMIT`
        catches nothing else. Counts in ``resets_done``; disarms itself after ``times``
        resets.
        """
        if not pattern:
            raise ValueError("pattern must not be empty")
        if times < 1:
            raise ValueError("times must be at least 1")
        self._reset_on = _ResetOn(bytes(pattern), forward_first, times)
        self._notify()

    def slicer(
        self,
        average_size: int = 10,
        size_variation: int = 5,
        delay_us: int = 50,
        direction: str = "both",
    ) -> None:
        """Cut every chunk into pieces of ``average_size`` ± ``size_variation`` bytes.

        Pieces are written one by one, ``delay_us`` apart on average: asyncio's timers
        cannot sleep less than about a millisecond, so shorter delays are kept on average
        by yielding to the event loop between pieces and sleeping once the debt reaches a
        millisecond.
        """
        if average_size < 1 or size_variation < 0 or delay_us < 0:
            raise ValueError("average_size must be >= 1, the others >= 0")
        self._slicer = _Slicer(average_size, size_variation, delay_us, _directions(direction))
        self._notify()

    def limit_data(self, limit_bytes: int, direction: str = "downstream") -> None:
        """Close connections gracefully (FIN) once ``limit_bytes`` more went one way.

        Counted per connection and direction from now on (or from the connection's start);
        the chunk that reaches the limit is cut at it, and nothing after it goes through.
        """
        if limit_bytes < 0:
            raise ValueError("limit_bytes must not be negative")
        self._budgets["graceful"] = _ByteBudget(limit_bytes, _directions(direction), "graceful")
        self._notify()

    # -- internals -------------------------------------------------------------------------

    def _notify(self) -> None:
        """Wake every pipe waiting on the toxics, so a change applies at once."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def _wait_for_change(self, at_most: float | None = None) -> None:
        """Wait until the toxics change, or ``at_most`` seconds."""
        changed = self._changed
        if at_most is None:
            await changed.wait()
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(at_most):
                await changed.wait()

    def _count_connection(self, connection: _Connection, *, add: bool) -> None:
        if add:
            self._connections.add(connection)
        else:
            self._connections.discard(connection)
        self._count_changed.set()
        self._count_changed = asyncio.Event()

    def _bind(self, port: int) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            # Rebinding in down() must not trip over the closed connections' TIME_WAIT.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setblocking(False)
            sock.bind((self.host, port))
        except BaseException:
            sock.close()
            raise
        return sock

    def _listen(self) -> None:
        assert self._loop is not None
        if self._listener is None:
            self._listener = self._bind(self.port)
        self._listener.listen(128)
        self._loop.add_reader(self._listener.fileno(), self._on_acceptable)
        self._listening = True

    def _unlisten(self) -> None:
        """Stop listening but keep the port: a bound socket that does not listen.

        There is no way back from listen(), so the listener is closed and the port bound
        again at once by a fresh socket, which refuses connections (the kernel answers RST
        to a SYN nobody listens for) and keeps other sockets, including outgoing
        connections picking an ephemeral port, from taking the port meanwhile.
        """
        if not self._listening:
            return
        assert self._loop is not None
        assert self._listener is not None
        self._loop.remove_reader(self._listener.fileno())
        self._listener.close()
        self._listening = False
        self._listener = None
        if not self._stopped:
            self._listener = self._bind(self.port)

    def _on_acceptable(self) -> None:
        assert self._listener is not None
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:  # out of file descriptors and the like
                self.errors.append(exc)
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            connection = _Connection(self, sock)
            self._count_connection(connection, add=True)
            connection.open()

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        assert self._loop is not None
        task = self._loop.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        # Retrieving the exception here is what keeps asyncio from logging "Task exception
        # was never retrieved"; recording it keeps a proxy bug from passing unnoticed.
        if not task.cancelled() and (exc := task.exception()) is not None:
            self.errors.append(exc)


def _set_linger_zero(sock: Any) -> None:
    """Make the next close() of ``sock`` send RST instead of FIN."""
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def _unacknowledged_bytes(sock: Any) -> int:
    """Bytes written to ``sock`` that the peer's kernel has not acknowledged yet (Linux)."""
    try:
        raw = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    except OSError:
        return 0
    return int(struct.unpack("i", raw)[0])


class _Connection:
    """One client connection and its connection to the upstream server."""

    def __init__(self, proxy: FaultProxy, client_socket: socket.socket) -> None:
        self.proxy = proxy
        self.client_socket: socket.socket | None = client_socket  # until a transport owns it
        self.client: _Side | None = None
        self.server: _Side | None = None
        self.pipes = {UPSTREAM: _Pipe(self, UPSTREAM), DOWNSTREAM: _Pipe(self, DOWNSTREAM)}
        self.closed = False
        self.closed_event = asyncio.Event()
        # Set by reset_on(forward_first=True) between forwarding the statement and the reset,
        # so the server's reply cannot slip through to the client meanwhile.
        self.frozen = False
        self.tasks: set[asyncio.Task[None]] = set()

    def open(self) -> None:
        task = self.proxy._spawn(self._open())
        task.add_done_callback(self._release_client_socket)
        self.tasks.add(task)

    def _release_client_socket(self, task: asyncio.Task[None]) -> None:
        """Close the accepted socket if no transport took it over (cancelled, even unstarted).

        If a transport was made and then closed, it closes this same socket object later,
        which is a no-op then.
        """
        if self.client_socket is not None:
            self.client_socket.close()
            self.client_socket = None

    async def _open(self) -> None:
        loop = asyncio.get_running_loop()
        assert self.client_socket is not None
        await loop.connect_accepted_socket(lambda: _Side(self, "client"), self.client_socket)
        self.client_socket = None  # the transport owns it now
        try:
            async with asyncio.timeout(_CONNECT_TIMEOUT):
                await loop.create_connection(
                    lambda: _Side(self, "server"),
                    self.proxy.upstream_host,
                    self.proxy.upstream_port,
                )
        except (OSError, TimeoutError):
            # The server cannot be reached: to the client that is a refused connection.
            self.close("reset")
            return
        if self.closed:
            return
        for pipe in self.pipes.values():
            self.tasks.add(self.proxy._spawn(pipe.run()))

    def received(self, side: _Side, data: bytes | None) -> None:
        self.pipes[UPSTREAM if side is self.client else DOWNSTREAM].feed(data)

    def lost(self, side: _Side, exc: Exception | None) -> None:
        """A side's transport is gone; unless we closed it, its peer went away."""
        if self.closed:
            return
        # A reset (or a write that failed) on one side is passed on as a reset to the other;
        # anything else as a close.
        self.close("reset" if exc is not None else "graceful")

    def pipe_finished(self) -> None:
        """Called when a pipe has passed on end-of-file; the second one closes the connection."""
        if all(pipe.finished for pipe in self.pipes.values()):
            self.close("graceful")

    def close(self, how: _Close) -> None:
        """Close both sides: FIN after the buffered data, FIN at once, or RST at once."""
        if self.closed:
            return
        self.closed = True
        self.closed_event.set()
        self.proxy._count_connection(self, add=False)
        if self.client_socket is not None and how == "reset":
            _set_linger_zero(self.client_socket)  # closed when the cancelled _open ends
        for side in (self.client, self.server):
            transport = side.transport if side is not None else None
            if transport is None or transport.is_closing():
                continue
            if how == "graceful":
                transport.close()
            else:
                if how == "reset":
                    _set_linger_zero(transport.get_extra_info("socket"))
                transport.abort()
        current = asyncio.current_task()
        for task in self.tasks:
            if task is not current:
                task.cancel()


class _Side(asyncio.Protocol):
    """The proxy's end of one TCP connection: to the client or to the server."""

    def __init__(self, connection: _Connection, role: Literal["client", "server"]) -> None:
        self.connection = connection
        self.role = role
        self.transport: asyncio.Transport | None = None
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.writable = asyncio.Event()
        self.writable.set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        # Writable means "write buffer empty": a pipe hands the kernel one chunk at a time
        # (backpressure as with sock_sendall), and end-of-file finds nothing left to flush.
        transport.set_write_buffer_limits(high=0)
        self.connection.proxy._sides.add(self)
        if self.role == "client":
            self.connection.client = self
        else:
            self.connection.server = self
        if self.connection.closed:  # the connection was closed while this side connected
            transport.abort()

    def data_received(self, data: bytes) -> None:
        self.connection.received(self, data)

    def eof_received(self) -> bool:
        self.connection.received(self, None)
        return True  # keep the transport open: the other direction may still carry data

    def connection_lost(self, exc: Exception | None) -> None:
        self.connection.proxy._sides.discard(self)
        if not self.lost.done():
            self.lost.set_result(None)
        self.writable.set()  # wake a pipe waiting to write; it will find the side closed
        self.connection.lost(self, exc)

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()


class _Pipe:
    """One direction of a connection: chunks in arrival order, toxics, then the other side."""

    def __init__(self, connection: _Connection, direction: str) -> None:
        self.connection = connection
        self.proxy = connection.proxy
        self.direction = direction
        self.items: deque[tuple[float, bytes | None]] = deque()
        self.buffered = 0
        self.source_paused = False
        self.ready = asyncio.Event()
        self.finished = False
        self.forwarded: dict[_ByteBudget, int] = {}  # bytes passed since the toxic was set
        self.tail = b""  # the last bytes before the current chunk, for reset_on

    @property
    def source(self) -> _Side | None:
        return self.connection.client if self.direction == UPSTREAM else self.connection.server

    @property
    def target(self) -> _Side | None:
        return self.connection.server if self.direction == UPSTREAM else self.connection.client

    def feed(self, data: bytes | None) -> None:
        """Queue a chunk (``None``: end-of-file) with its arrival time."""
        self.items.append((asyncio.get_running_loop().time(), data))
        if data:
            self.buffered += len(data)
            source = self.source
            if self.buffered > _HIGH_WATER and not self.source_paused and source is not None:
                assert source.transport is not None
                source.transport.pause_reading()
                self.source_paused = True
        self.ready.set()

    async def _next(self) -> tuple[float, bytes | None]:
        while not self.items:
            self.ready.clear()
            await self.ready.wait()
        arrival, data = self.items.popleft()
        if data:
            self.buffered -= len(data)
            source = self.source
            if self.source_paused and self.buffered < _LOW_WATER and source is not None:
                assert source.transport is not None
                source.transport.resume_reading()
                self.source_paused = False
        return arrival, data

    async def run(self) -> None:
        while True:
            arrival, data = await self._next()
            await self._hold(arrival)
            if data is None:
                await self._write_eof()
                return
            if self.direction == UPSTREAM and await self._reset_on(data):
                return
            data, ending = self._apply_budgets(data)
            await self._write(data)
            if ending is not None:
                self.connection.close(ending)
                return

    async def _hold(self, arrival: float) -> None:
        """Wait while a blackhole is on, and until the chunk's latency has passed."""
        loop = asyncio.get_running_loop()
        sampled: _Latency | None = None
        jitter = 0.0
        while True:
            if self.proxy._blackhole:
                await self.proxy._wait_for_change()
                continue
            latency = self.proxy._latency
            if latency is None or self.direction not in latency.directions:
                return
            if latency is not sampled:  # one jitter draw per chunk and setting
                sampled = latency
                jitter = random.uniform(-latency.jitter_ms, latency.jitter_ms)
            remaining = arrival + max(0.0, latency.ms + jitter) / 1000 - loop.time()
            if remaining <= 0:
                return
            await self.proxy._wait_for_change(remaining)

    async def _reset_on(self, data: bytes) -> bool:
        """Apply reset_on to a client chunk; True when it reset the connection."""
        toxic = self.proxy._reset_on
        if toxic is None:
            self.tail = b""
            return False
        window = self.tail + data
        keep = len(toxic.pattern) - 1
        self.tail = window[-keep:] if keep else b""
        if toxic.pattern not in window:
            return False
        toxic.remaining -= 1
        if toxic.remaining == 0:
            self.proxy._reset_on = None
        self.proxy.resets_done += 1
        if toxic.forward_first:
            self.connection.frozen = True
            await self._send(data)
            await self._until_delivered()
        self.connection.close("reset")
        return True

    async def _until_delivered(self) -> None:
        """Wait until the server's kernel has acknowledged everything written to it.

        Then the server will read those bytes even though an RST follows (Linux hands out
        received data before it reports the reset).
        """
        target = self.target
        transport = target.transport if target is not None else None
        if transport is None:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _DELIVERY_TIMEOUT
        while not transport.is_closing() and loop.time() < deadline:
            sock = transport.get_extra_info("socket")
            if transport.get_write_buffer_size() == 0 and (
                sock is None or _unacknowledged_bytes(sock) == 0
            ):
                return
            await asyncio.sleep(0.001)

    def _apply_budgets(self, data: bytes) -> tuple[bytes, _Close | None]:
        """Cut ``data`` at the first byte budget it exhausts; say how to end, if so."""
        allowed = len(data)
        ending: _Close | None = None
        for budget in list(self.proxy._budgets.values()):
            if self.direction not in budget.directions:
                continue
            left = max(0, budget.limit - self.forwarded.get(budget, 0))
            if left <= allowed:
                allowed, ending = left, budget.ending
        for budget in self.proxy._budgets.values():
            if self.direction in budget.directions:
                self.forwarded[budget] = self.forwarded.get(budget, 0) + allowed
        return data[:allowed], ending

    async def _write(self, data: bytes) -> None:
        slicer = self.proxy._slicer
        if slicer is None or self.direction not in slicer.directions:
            await self._send(data)
            return
        loop = asyncio.get_running_loop()
        due = loop.time()
        start = 0
        while start < len(data):
            if start:
                due += slicer.delay_us / 1_000_000
                wait = due - loop.time()
                await asyncio.sleep(wait if wait >= 0.001 else 0)
            size = slicer.average_size + random.randint(
                -slicer.size_variation, slicer.size_variation
            )
            end = start + max(1, size)
            await self._send(data[start:end])
            start = end

    async def _send(self, data: bytes) -> None:
        if self.direction == DOWNSTREAM and self.connection.frozen:
            await self.connection.closed_event.wait()  # the reset is under way
            return
        target = self.target
        if not data or self.connection.closed or target is None or target.transport is None:
            return
        if target.transport.is_closing():
            return
        target.transport.write(data)
        await target.writable.wait()

    async def _write_eof(self) -> None:
        """Pass end-of-file on (half-close); the connection closes when both pipes have."""
        target = self.target
        transport = target.transport if target is not None else None
        if target is not None and transport is not None and not transport.is_closing():
            # With nothing left to flush, write_eof() shuts the socket down right here, where
            # a peer that is gone already (reset, not yet read: ENOTCONN) can be handled;
            # asyncio's own shutdown after a flush does not expect that error.
            await target.writable.wait()
            try:
                transport.write_eof()
            except OSError:
                self.connection.close("reset")
                return
        self.finished = True
        self.connection.pipe_finished()
