"""FaultProxy does what each toxic promises, against a small echo server (no database).

Every test talks through the proxy with a plain socket, so what it sees is what a database
driver would see: bytes, end-of-file (FIN) or ``ConnectionResetError`` (RST). The echo server
records what reached it and how its connection ended, which is the server's view.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import socket
import struct
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager

import pytest

from tests.faults.proxy import FaultProxy


class EchoConnection(asyncio.Protocol):
    """One connection to the echo server: sends back what it gets and notes how it ended."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.received = bytearray()
        self.ending: str | None = None  # "eof", "reset" or "closed"
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.received += data
        assert self.transport is not None
        self.transport.write(data)

    def eof_received(self) -> bool:
        self.ending = "eof"
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.ending is None:
            self.ending = "reset" if isinstance(exc, ConnectionResetError) else "closed"
        self.lost.set_result(None)


class EchoServer:
    """An asyncio echo server on 127.0.0.1 that keeps every connection for inspection."""

    def __init__(self) -> None:
        self.connections: list[EchoConnection] = []
        self.port = 0
        self._server: asyncio.Server | None = None

    def _accept(self) -> EchoConnection:
        connection = EchoConnection()
        self.connections.append(connection)
        return connection

    async def start(self) -> None:
        self._server = await asyncio.get_running_loop().create_server(self._accept, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for connection in self.connections:
            if connection.transport is not None:
                connection.transport.abort()
        await asyncio.gather(*(c.lost for c in self.connections if c.transport is not None))
        await self._server.wait_closed()

    @property
    def received(self) -> bytes:
        """Everything every connection received, in connection order."""
        return b"".join(bytes(c.received) for c in self.connections)


class Client:
    """A TCP client on a plain non-blocking socket: one ``recv()`` per :meth:`recv`."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.loop = asyncio.get_running_loop()

    async def send(self, data: bytes) -> None:
        await self.loop.sock_sendall(self.sock, data)

    async def recv(self, within: float = 2.0) -> bytes:
        """One read; ``b""`` at end-of-file. Raises TimeoutError if nothing comes."""
        return await asyncio.wait_for(self.loop.sock_recv(self.sock, 65536), within)

    async def recv_exactly(self, size: int, within: float = 2.0) -> tuple[bytes, int]:
        """Read ``size`` bytes; return them and how many reads it took."""
        data = bytearray()
        reads = 0
        async with asyncio.timeout(within):
            while len(data) < size:
                chunk = await self.loop.sock_recv(self.sock, 65536)
                if not chunk:
                    raise AssertionError(f"end-of-file after {len(data)} of {size} bytes")
                data += chunk
                reads += 1
        return bytes(data), reads

    async def recv_to_end(self, within: float = 2.0) -> tuple[bytes, str]:
        """Read until the connection ends; return the data and "eof" or "reset"."""
        data = bytearray()
        async with asyncio.timeout(within):
            while True:
                try:
                    chunk = await self.loop.sock_recv(self.sock, 65536)
                except ConnectionResetError:
                    return bytes(data), "reset"
                if not chunk:
                    return bytes(data), "eof"
                data += chunk


@asynccontextmanager
async def connect(port: int) -> AsyncIterator[Client]:
    """A connected :class:`Client`, closed on the way out."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        await asyncio.wait_for(
            asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port)), 2
        )
        yield Client(sock)
    finally:
        sock.close()


async def roundtrip(client: Client, data: bytes = b"ping") -> float:
    """Seconds for ``data`` to go through the proxy to the echo server and back."""
    started = time.monotonic()
    await client.send(data)
    assert (await client.recv_exactly(len(data)))[0] == data
    return time.monotonic() - started


async def until(condition: Callable[[], bool], within: float = 2.0) -> None:
    """Wait until ``condition()`` holds (what it watches has no event to wait on)."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.005)


@pytest.fixture(autouse=True)
def _asyncio_logs_no_error(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Fail a test after which asyncio logged a problem (say, "Task exception was never
    retrieved" or a failed protocol callback): the proxy must handle its closed sockets."""
    caplog.set_level(logging.WARNING, logger="asyncio")
    yield
    gc.collect()  # unretrieved task exceptions are reported when the task is collected
    records = [*caplog.get_records("setup"), *caplog.get_records("call"), *caplog.records]
    problems = [r.getMessage() for r in records if r.name.startswith("asyncio")]
    assert problems == []


@pytest.fixture
async def echo() -> AsyncIterator[EchoServer]:
    server = EchoServer()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def proxy(echo: EchoServer) -> AsyncIterator[FaultProxy]:
    async with FaultProxy("127.0.0.1", echo.port) as fault_proxy:
        yield fault_proxy
        assert fault_proxy.errors == []


async def test_without_toxics_bytes_pass_unchanged_both_ways(
    proxy: FaultProxy, echo: EchoServer
) -> None:
    payload = os.urandom(300_000)  # more than one read and the pipes' buffers
    async with connect(proxy.port) as client:
        await proxy.wait_for_connections(1)
        send = asyncio.ensure_future(client.send(payload))
        received, _ = await client.recv_exactly(len(payload))
        await send
        assert received == payload
        assert echo.received == payload
    await proxy.wait_for_connections(0)  # the client's close went through as a close
    await until(lambda: echo.connections[0].ending == "eof")


async def test_latency_delays_each_chunk_in_the_chosen_direction(proxy: FaultProxy) -> None:
    async with connect(proxy.port) as client:
        assert await roundtrip(client) < 0.1
        proxy.latency(100, direction="upstream")  # applies to the open connection too
        assert 0.1 <= await roundtrip(client) < 0.3
        proxy.latency(60)  # both ways: paid twice on a round trip
        assert 0.12 <= await roundtrip(client) < 0.35
        proxy.clear()
        assert await roundtrip(client) < 0.1


async def test_latency_with_jitter_keeps_the_order_of_a_direction(proxy: FaultProxy) -> None:
    pieces = [f"<{n:03d}>".encode() for n in range(40)]
    async with connect(proxy.port) as client:
        proxy.latency(15, jitter_ms=15)
        for piece in pieces:  # separate chunks, each drawing its own delay
            await client.send(piece)
            await asyncio.sleep(0.001)
        received, _ = await client.recv_exactly(len(b"".join(pieces)))
    assert received == b"".join(pieces)


async def test_down_closes_connections_and_refuses_new_ones_until_up(
    proxy: FaultProxy,
) -> None:
    async with connect(proxy.port) as client:
        await roundtrip(client)
        started = time.monotonic()
        proxy.down()
        assert await client.recv_to_end(within=1) == (b"", "eof")
    with pytest.raises(ConnectionRefusedError):
        async with connect(proxy.port):
            pass
    assert time.monotonic() - started < 0.5
    assert proxy.connection_count == 0
    proxy.up()
    async with connect(proxy.port) as client:
        await roundtrip(client)


async def test_blackhole_forwards_nothing_and_closes_nothing(
    proxy: FaultProxy, echo: EchoServer
) -> None:
    async with connect(proxy.port) as old:
        await roundtrip(old, b"before")
        proxy.blackhole()
        await old.send(b"held")
        async with connect(proxy.port) as new:  # new connections are accepted too
            await new.send(b"also held")
            await asyncio.sleep(0.3)
            # Neither data nor end-of-file came back: the connections are silent, not closed.
            for client in (old, new):
                with pytest.raises(TimeoutError):
                    await client.recv(within=0.01)
            assert echo.received == b"before"
            assert proxy.connection_count == 2
            proxy.clear()  # held bytes flow on
            assert await old.recv_exactly(4) == (b"held", 1)
            assert (await new.recv_exactly(9))[0] == b"also held"


async def test_reset_peer_resets_both_sides_after_the_given_bytes(
    proxy: FaultProxy, echo: EchoServer
) -> None:
    async with connect(proxy.port) as client:
        await roundtrip(client)
        proxy.reset_peer(after_bytes=5)  # counted from now, downstream
        await client.send(b"hello world")
        data, ending = await client.recv_to_end()
    assert ending == "reset"
    assert b"hello".startswith(data)  # at most the 5 bytes before the reset
    await until(lambda: echo.connections[0].ending == "reset")

    proxy.reset_peer(direction="upstream")  # 0 bytes: the first chunk is the last
    async with connect(proxy.port) as client:
        await client.send(b"never arrives")
        assert await client.recv_to_end() == (b"", "reset")
    await until(lambda: echo.connections[1].ending == "reset")
    assert echo.connections[1].received == b""
    assert proxy.connection_count == 0


async def test_reset_on_before_forwarding_the_server_never_sees_the_pattern(
    proxy: FaultProxy, echo: EchoServer
) -> None:
    async with connect(proxy.port) as client:
        await roundtrip(client, b"BEGIN;")
        proxy.reset_on(b"COMMIT", forward_first=False)
        await client.send(b"COMMIT;")
        assert await client.recv_to_end() == (b"", "reset")
    await until(lambda: echo.connections[0].ending == "reset")
    assert echo.connections[0].received == b"BEGIN;"
    assert proxy.resets_done == 1

    # Disarmed after one reset: the next COMMIT goes through.
    async with connect(proxy.port) as client:
        await roundtrip(client, b"COMMIT;")

    # A pattern split over two chunks is found in the second one.
    proxy.reset_on(b"COMMIT", forward_first=False)
    async with connect(proxy.port) as client:
        await roundtrip(client, b"COM")
        await client.send(b"MIT;")
        assert await client.recv_to_end() == (b"", "reset")
    await until(lambda: echo.connections[2].ending == "reset")
    assert echo.connections[2].received == b"COM"
    assert proxy.resets_done == 2


async def test_reset_on_after_forwarding_the_server_sees_it_and_the_client_gets_no_reply(
    proxy: FaultProxy, echo: EchoServer
) -> None:
    proxy.reset_on(b"COMMIT", forward_first=True, times=2)
    for number in range(2):
        async with connect(proxy.port) as client:
            await roundtrip(client, b"BEGIN;")
            await client.send(b"COMMIT;")
            # The echo server answers at once; the reply must still not get through.
            assert await client.recv_to_end() == (b"", "reset")
        await until(lambda n=number: echo.connections[n].ending == "reset")  # type: ignore[misc]
        assert echo.connections[number].received == b"BEGIN;COMMIT;"
    assert proxy.resets_done == 2
    async with connect(proxy.port) as client:  # disarmed after ``times``
        await roundtrip(client, b"COMMIT;")


async def test_slicer_delivers_the_same_bytes_in_many_small_pieces(proxy: FaultProxy) -> None:
    payload = os.urandom(2000)
    async with connect(proxy.port) as client:
        await client.send(payload)
        received, reads_without = await client.recv_exactly(len(payload))
        assert received == payload
        proxy.slicer(average_size=10, size_variation=5, delay_us=50)
        await client.send(payload)
        received, reads_with = await client.recv_exactly(len(payload))
        assert received == payload
    assert reads_without <= 2
    assert reads_with >= 40  # pieces of 5..15 bytes: ~200 of them, some read together


async def test_limit_data_closes_after_the_limit_and_passes_nothing_more(
    proxy: FaultProxy, echo: EchoServer
) -> None:
    async with connect(proxy.port) as client:
        await roundtrip(client, b"12345")
        proxy.limit_data(10)  # counted from now, downstream
        await client.send(b"0123456789abcdefghij")
        assert await client.recv_to_end() == (b"0123456789", "eof")
    await proxy.wait_for_connections(0)

    proxy.limit_data(4, direction="upstream")
    async with connect(proxy.port) as client:
        await client.send(b"abcdefgh")
        data, ending = await client.recv_to_end()
    assert ending == "eof"
    assert b"abcd".startswith(data)
    assert echo.connections[1].received == b"abcd"


async def test_end_of_file_towards_a_peer_that_reset_becomes_a_reset(
    proxy: FaultProxy, echo: EchoServer
) -> None:
    """The client half-closes just after the server reset, before the proxy has read the
    reset: passing end-of-file on fails (ENOTCONN), which must end the connection with a
    reset, not kill a pipe task and leave the client hanging."""
    async with connect(proxy.port) as client:
        await roundtrip(client)
        (connection,) = proxy._connections
        assert connection.server is not None
        assert connection.server.transport is not None
        connection.server.transport.pause_reading()  # so the proxy does not see the RST
        server_side = echo.connections[0].transport
        assert server_side is not None
        server_side.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
        )
        server_side.abort()
        await asyncio.sleep(0.05)  # the RST reaches the proxy's socket
        client.sock.shutdown(socket.SHUT_WR)
        assert await client.recv_to_end() == (b"", "reset")
    assert proxy.errors == []


async def test_an_unreachable_upstream_resets_the_client() -> None:
    # A bound socket that does not listen: connecting to its port is refused.
    with socket.socket() as nobody:
        nobody.bind(("127.0.0.1", 0))
        async with FaultProxy("127.0.0.1", nobody.getsockname()[1]) as proxy:
            async with connect(proxy.port) as client:
                assert await client.recv_to_end() == (b"", "reset")
            assert proxy.connection_count == 0


async def test_stop_closes_everything_and_leaves_no_task_behind(echo: EchoServer) -> None:
    proxy = FaultProxy("127.0.0.1", echo.port)
    await proxy.start()
    async with connect(proxy.port) as slow, connect(proxy.port) as held:
        await proxy.wait_for_connections(2)
        proxy.latency(10_000, direction="downstream")
        await slow.send(b"answer in ten seconds")
        await until(lambda: len(echo.received) == 21)  # the reply waits in the proxy
        proxy.blackhole()
        await held.send(b"never")
        await proxy.stop()
        assert await slow.recv_to_end() == (b"", "eof")
        # "never" may still be unread in the proxy's socket, and then the kernel turns the
        # close into a reset; either way the connection ended, with nothing forwarded.
        data, _ = await held.recv_to_end()
        assert data == b""
    assert proxy.errors == []
    assert proxy.connection_count == 0
    assert not proxy._tasks
    assert not proxy._sides
    leftovers = [
        task
        for task in asyncio.all_tasks()
        if task.get_coro().__qualname__.startswith(("_Connection.", "_Pipe."))  # type: ignore[union-attr]
    ]
    assert leftovers == []
    with pytest.raises(ConnectionRefusedError):
        async with connect(proxy.port):
            pass
