"""bastion.event_loop: uvloop that accepts every waiting connection in one turn.

The loops here are real uvloop loops on loopback sockets. Counting loop turns, not time, is
what makes the accept tests exact: the clients connect while the loop is not running, so
every connection waits in the kernel's accept queue, and then the loop runs a fixed number
of turns.
"""

from __future__ import annotations

import asyncio
import resource
import select
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest
import uvloop

from bastion.event_loop import BatchAcceptingLoop, BatchAcceptingServer, new_event_loop
from tests.conftest import IN_CI, free_port

WAITING = 50
TURNS = 6  # the readiness, the hand-over tasks, connection_made, and room to spare


class Recorder(asyncio.Protocol):
    made: list[asyncio.BaseTransport]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.made.append(transport)


def recorder_factory() -> tuple[Callable[[], Recorder], list[asyncio.BaseTransport]]:
    made: list[asyncio.BaseTransport] = []

    def factory() -> Recorder:
        protocol = Recorder()
        protocol.made = made
        return protocol

    return factory, made


async def turns(count: int) -> None:
    for _ in range(count):
        await asyncio.sleep(0)


@contextmanager
def running(loop: asyncio.AbstractEventLoop) -> Iterator[asyncio.AbstractEventLoop]:
    try:
        yield loop
    finally:
        # A test that failed may leave tasks behind: cancel them, so the loop can close.
        left = asyncio.all_tasks(loop)
        for task in left:
            task.cancel()
        if left:
            loop.run_until_complete(asyncio.wait(left))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


def connections_accepted_in_turns(
    loop: asyncio.AbstractEventLoop, unix_path: Path | None = None
) -> int:
    """Queue ``WAITING`` connections with the loop stopped, run ``TURNS`` turns, count.

    On TCP (loopback), or on a Unix socket at ``unix_path``.
    """
    factory, made = recorder_factory()
    if unix_path is None:
        server = loop.run_until_complete(loop.create_server(factory, "127.0.0.1", 0, backlog=128))
        port = server.sockets[0].getsockname()[1]
    else:
        server = loop.run_until_complete(
            loop.create_unix_server(factory, str(unix_path), backlog=128)
        )
    with ExitStack() as clients:
        for _ in range(WAITING):
            if unix_path is None:
                clients.enter_context(socket.create_connection(("127.0.0.1", port)))
            else:
                client = clients.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
                client.connect(str(unix_path))
        loop.run_until_complete(turns(TURNS))
        accepted = len(made)
        for transport in made:
            transport.close()
        server.close()
        loop.run_until_complete(server.wait_closed())
    return accepted


def test_every_waiting_connection_is_accepted_in_a_few_turns() -> None:
    with running(new_event_loop()) as loop:
        assert isinstance(loop, uvloop.Loop)
        assert connections_accepted_in_turns(loop) == WAITING


def test_plain_uvloop_still_accepts_one_connection_per_turn() -> None:
    """Why the module exists. When this fails, libuv accepts in batches again: drop it."""
    with running(uvloop.new_event_loop()) as loop:
        assert connections_accepted_in_turns(loop) < WAITING


def test_a_given_socket_is_served() -> None:
    with running(new_event_loop()) as loop:
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        factory, made = recorder_factory()
        server = loop.run_until_complete(loop.create_server(factory, sock=listener))
        assert isinstance(server, BatchAcceptingServer)
        with socket.create_connection(listener.getsockname()):
            loop.run_until_complete(turns(TURNS))
            assert len(made) == 1
            made[0].close()
        server.close()
        assert server.sockets == ()
        assert listener.fileno() == -1


def test_a_busy_address_names_itself_in_the_error() -> None:
    with running(new_event_loop()) as loop, socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        factory, _made = recorder_factory()
        with pytest.raises(OSError, match=rf"bind on address \('127\.0\.0\.1', {port}\)"):
            loop.run_until_complete(loop.create_server(factory, "127.0.0.1", port))


def test_host_and_sock_together_are_refused() -> None:
    with running(new_event_loop()) as loop, socket.socket() as listener:
        factory, _made = recorder_factory()
        with pytest.raises(ValueError, match="at the same time"):
            loop.run_until_complete(loop.create_server(factory, "127.0.0.1", 0, sock=listener))
        with pytest.raises(ValueError, match="Neither host/port nor sock"):
            loop.run_until_complete(loop.create_server(factory))


def test_a_closed_server_accepts_nothing_more() -> None:
    with running(BatchAcceptingLoop()) as loop:
        factory, made = recorder_factory()
        server = loop.run_until_complete(loop.create_server(factory, "127.0.0.1", 0))
        address = server.sockets[0].getsockname()
        server.close()
        loop.run_until_complete(server.wait_closed())
        assert not server.is_serving()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(address, timeout=1)
        with pytest.raises(RuntimeError, match="closed"):
            loop.run_until_complete(server.start_serving())
        assert made == []


UVICORN_SERVER = textwrap.dedent(
    """
    import asyncio, sys, uvicorn

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        name = type(asyncio.get_running_loop()).__name__.encode()
        headers = [(b"content-length", str(len(name)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": name})

    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), lifespan="off",
                loop="bastion.event_loop:new_event_loop", log_level="info")
    """
)


def wait_for_port(port: int, process: subprocess.Popen[str]) -> None:
    for _ in range(200):
        assert process.poll() is None, process.communicate()[0]
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    pytest.fail("the server never listened")


def get(connection: socket.socket) -> bytes:
    """One request on ``connection``; the answer, read until its body (the loop's name)."""
    connection.sendall(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
    answer = b""
    while not answer.endswith(b"Loop") and len(answer) < 4096:
        chunk = connection.recv(4096)
        if not chunk:
            break
        answer += chunk
    return answer


@contextmanager
def uvicorn_serving(script: str, where: str) -> Iterator[subprocess.Popen[str]]:
    """``script`` run with ``where`` (its port or socket path); on the way out it is stopped
    with SIGINT, and must have stopped cleanly."""
    process = subprocess.Popen(
        [sys.executable, "-c", script, where],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        yield process
    finally:
        process.send_signal(signal.SIGINT)
        log, _ = process.communicate(timeout=15)
    assert process.returncode == 0, log
    assert "Finished server process" in log
    assert "Traceback" not in log


def assert_served_on_this_loop(answers: list[bytes]) -> None:
    assert all(answer.startswith(b"HTTP/1.1 200") for answer in answers)
    assert all(answer.endswith(b"BatchAcceptingLoop") for answer in answers)


def test_uvicorn_serves_many_connections_on_it_and_stops_cleanly() -> None:
    port = free_port()
    with uvicorn_serving(UVICORN_SERVER, str(port)) as process:
        wait_for_port(port, process)
        with ExitStack() as clients:
            connections = [
                clients.enter_context(socket.create_connection(("127.0.0.1", port), timeout=10))
                for _ in range(200)
            ]
            answers = [get(connection) for connection in connections]
        assert_served_on_this_loop(answers)


ECHO_SERVER_WITH_FEW_FILES = textwrap.dedent(
    """
    import asyncio, os, resource, sys
    from bastion.event_loop import new_event_loop

    class Echo(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport = transport
        def data_received(self, data):
            self.transport.write(data)

    async def main():
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Echo, "127.0.0.1", int(sys.argv[1]))
        # Room for a handful of connections beyond what is open now.
        in_use = len(os.listdir("/proc/self/fd"))
        resource.setrlimit(resource.RLIMIT_NOFILE, (in_use + 4, resource.getrlimit(
            resource.RLIMIT_NOFILE)[1]))
        print("ready", flush=True)
        await asyncio.sleep(3600)

    new_event_loop().run_until_complete(main())
    """
)


@pytest.mark.skipif(not hasattr(resource, "RLIMIT_NOFILE"), reason="needs RLIMIT_NOFILE")
def test_out_of_file_descriptors_pauses_accepting_and_then_serves_again() -> None:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-c", ECHO_SERVER_WITH_FEW_FILES, str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], 30)
        assert ready, "the server never started"
        assert process.stdout.readline().strip() == "ready"
        # More clients than the server has descriptors for: accepting fails with EMFILE.
        crowd = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(8)]
        for client in crowd:
            client.close()
        # The server frees a descriptor as each of the crowd's connections ends, accepting
        # again after each pause; then the newcomer, queued behind them, is served.
        with socket.create_connection(("127.0.0.1", port), timeout=30) as newcomer:
            newcomer.sendall(b"hello")
            assert newcomer.recv(5) == b"hello"
        assert process.poll() is None, "the server stopped"
    finally:
        process.kill()
        log, _ = process.communicate(timeout=15)
    assert "accepting a connection failed (Too many open files)" in log


class Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport  # uvloop's TLS transport is no asyncio.Transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


@pytest.fixture
def tls_contexts(tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A server context with a self-signed certificate for 127.0.0.1, and a client trusting it."""
    if shutil.which("openssl") is None:
        if IN_CI:
            pytest.fail("the openssl command is missing (.ci/run installs it)")
        pytest.skip("needs the openssl command to make a certificate")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    request = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
    subject = ["-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"]
    subprocess.run(
        [*request, *subject, "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert, key)
    client = ssl.create_default_context(cafile=str(cert))
    return server, client


def reported_errors(loop: asyncio.AbstractEventLoop) -> list[dict[str, Any]]:
    """What the loop's exception handler is given from now on."""
    reported: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    return reported


def test_tls_connections_are_accepted_and_a_failed_handshake_stops_nothing(
    tls_contexts: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    server_context, client_context = tls_contexts

    async def scenario() -> tuple[bytes, bytes]:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            Echo, "127.0.0.1", 0, ssl=server_context, ssl_handshake_timeout=5
        )
        port = server.sockets[0].getsockname()[1]
        # A client that speaks no TLS: its handshake fails on the server, alone.
        plain_reader, plain = await asyncio.open_connection("127.0.0.1", port)
        plain.write(b"GET / HTTP/1.1\r\n\r\n")
        await plain.drain()
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_context)
        writer.write(b"over tls")
        echoed = await asyncio.wait_for(reader.readexactly(8), 10)
        plain_answer = await asyncio.wait_for(plain_reader.read(), 10)
        for stream in (plain, writer):
            stream.close()
        server.close()
        await server.wait_closed()
        return echoed, plain_answer

    with running(new_event_loop()) as loop:
        reported = reported_errors(loop)
        echoed, plain_answer = loop.run_until_complete(scenario())
    assert echoed == b"over tls"
    assert plain_answer == b""  # the server closed the connection that failed its handshake
    assert reported == []  # a client's failed handshake is no error of the server's


def test_closing_drops_a_pending_tls_handshake_instead_of_waiting_for_it(
    tls_contexts: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    server_context, _client_context = tls_contexts

    async def scenario() -> bytes:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            Echo, "127.0.0.1", 0, ssl=server_context, ssl_handshake_timeout=60
        )
        # Connected, silent: the server waits for a ClientHello that never comes.
        silent_reader, silent = await asyncio.open_connection(*server.sockets[0].getsockname())
        await turns(TURNS)
        server.close()
        # Far less than the handshake's 60 s: close() does not wait for the handshake.
        await asyncio.wait_for(server.wait_closed(), 10)
        answer = await asyncio.wait_for(silent_reader.read(), 10)
        silent.close()
        return answer

    with running(new_event_loop()) as loop:
        assert loop.run_until_complete(scenario()) == b""


def test_wait_closed_waits_until_the_server_is_closed() -> None:
    async def scenario() -> tuple[bool, bool]:
        loop = asyncio.get_running_loop()
        factory, _made = recorder_factory()
        server = await loop.create_server(factory, "127.0.0.1", 0)
        waiting = asyncio.create_task(server.wait_closed())
        await turns(TURNS)
        done_while_open = waiting.done()
        server.close()
        await asyncio.wait_for(waiting, 10)
        return done_while_open, waiting.done()

    with running(new_event_loop()) as loop:
        assert loop.run_until_complete(scenario()) == (False, True)


def test_a_failing_protocol_factory_is_reported_and_the_server_goes_on() -> None:
    calls = 0

    def factory() -> Echo:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("the first protocol could not be made")
        return Echo()

    async def scenario() -> tuple[bytes, bytes]:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(factory, "127.0.0.1", 0)
        address = server.sockets[0].getsockname()
        first_reader, first = await asyncio.open_connection(*address)
        first_answer = await asyncio.wait_for(first_reader.read(), 10)
        second_reader, second = await asyncio.open_connection(*address)
        second.write(b"ping")
        second_answer = await asyncio.wait_for(second_reader.readexactly(4), 10)
        for stream in (first, second):
            stream.close()
        server.close()
        await server.wait_closed()
        return first_answer, second_answer

    with running(new_event_loop()) as loop:
        reported = reported_errors(loop)
        first_answer, second_answer = loop.run_until_complete(scenario())
    assert first_answer == b""  # its socket was closed
    assert second_answer == b"ping"
    assert [str(context["exception"]) for context in reported] == [
        "the first protocol could not be made"
    ]


def test_tls_settings_without_tls_are_refused_up_front() -> None:
    with running(new_event_loop()) as loop:
        factory, _made = recorder_factory()
        with pytest.raises(ValueError, match="need ssl"):
            loop.run_until_complete(
                loop.create_server(factory, "127.0.0.1", 0, ssl_handshake_timeout=5)
            )
        with pytest.raises(TypeError, match="SSLContext"):
            loop.run_until_complete(
                loop.create_server(factory, "127.0.0.1", 0, ssl=True)  # type: ignore[arg-type]
            )


# -- Unix sockets (uvicorn's --uds) ---------------------------------------------------------


def test_every_waiting_unix_connection_is_accepted_in_a_few_turns(tmp_path: Path) -> None:
    with running(new_event_loop()) as loop:
        assert connections_accepted_in_turns(loop, tmp_path / "s.sock") == WAITING


def test_plain_uvloop_accepts_one_unix_connection_per_turn(tmp_path: Path) -> None:
    """Why ``create_unix_server`` is replaced too."""
    with running(uvloop.new_event_loop()) as loop:
        assert connections_accepted_in_turns(loop, tmp_path / "s.sock") < WAITING


def test_a_stale_socket_file_is_replaced_and_another_file_is_not(tmp_path: Path) -> None:
    with running(new_event_loop()) as loop:
        factory, made = recorder_factory()
        stale = tmp_path / "stale.sock"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as gone:
            gone.bind(str(stale))  # a server that died without removing its socket file
        server = loop.run_until_complete(loop.create_unix_server(factory, stale))
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(str(stale))
            loop.run_until_complete(turns(TURNS))
            assert len(made) == 1
            made[0].close()
        server.close()
        loop.run_until_complete(server.wait_closed())

        kept = tmp_path / "notes.txt"
        kept.write_text("not a socket")
        with pytest.raises(OSError, match=rf"bind on address '{kept}'"):
            loop.run_until_complete(loop.create_unix_server(factory, kept))
        assert kept.read_text() == "not a socket"


def test_a_given_unix_socket_is_served_and_wrong_arguments_are_refused(tmp_path: Path) -> None:
    with (
        running(new_event_loop()) as loop,
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener,
    ):
        factory, made = recorder_factory()
        path = str(tmp_path / "given.sock")
        listener.bind(path)
        with pytest.raises(ValueError, match="at the same time"):
            loop.run_until_complete(loop.create_unix_server(factory, path, sock=listener))
        with pytest.raises(ValueError, match="no sock"):
            loop.run_until_complete(loop.create_unix_server(factory))
        with socket.socket() as tcp, pytest.raises(ValueError, match="UNIX Domain Stream"):
            loop.run_until_complete(loop.create_unix_server(factory, sock=tcp))
        with pytest.raises(ValueError, match="need ssl"):
            loop.run_until_complete(
                loop.create_unix_server(factory, path, ssl_handshake_timeout=1.0)
            )
        server = loop.run_until_complete(loop.create_unix_server(factory, sock=listener))
        assert isinstance(server, BatchAcceptingServer)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(path)
            loop.run_until_complete(turns(TURNS))
            assert len(made) == 1
            made[0].close()
        server.close()
        assert listener.fileno() == -1


UVICORN_UDS_SERVER = UVICORN_SERVER.replace(
    'host="127.0.0.1", port=int(sys.argv[1])', "uds=sys.argv[1]"
)


def wait_for_unix_socket(path: Path, process: subprocess.Popen[str]) -> None:
    for _ in range(200):
        assert process.poll() is None, process.communicate()[0]
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(str(path))
                return
            except OSError:  # not bound yet, or bound and not listening yet
                time.sleep(0.05)
    pytest.fail("the server never listened")


def test_uvicorn_serves_a_unix_socket_on_it(tmp_path: Path) -> None:
    path = tmp_path / "uvicorn.sock"
    with uvicorn_serving(UVICORN_UDS_SERVER, str(path)) as process:
        wait_for_unix_socket(path, process)
        with ExitStack() as clients:
            connections = []
            for _ in range(100):
                client = clients.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
                client.settimeout(10)
                client.connect(str(path))
                connections.append(client)
            answers = [get(connection) for connection in connections]
        assert_served_on_this_loop(answers)
