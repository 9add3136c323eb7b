"""The ``conversations`` command: create users and keys, and run the demo.

``conversations create-user NAME`` prints only the new API key on stdout, so it can be
captured: ``KEY=$(conversations create-user alice)``.
"""

from __future__ import annotations

import asyncio
import copy
import enum
from datetime import timedelta
from typing import Annotated, Any

import typer

from bastion import Database, UniqueViolationError, install_request_id_logging, load_settings
from bastion.cli._run import fail, run_cli
from bastion.migrations import is_at_head, upgrade
from conversations import MIGRATIONS
from conversations.routes._writes import purge_idempotency_keys
from conversations.users import create_user, issue_key

__all__ = ["app", "main"]

app = typer.Typer(
    name="conversations",
    help="The Bastion reference service: a conversation store.",
    no_args_is_help=True,
    add_completion=False,
)


async def _require_migrated(database: Database) -> None:
    if not await is_at_head(database, MIGRATIONS):
        fail(
            "the database schema is not up to date; run: "
            f"bastion db upgrade --migrations {MIGRATIONS}"
        )


@app.command("create-user")
def create_user_command(
    name: Annotated[str, typer.Argument(help="A unique user name.")],
) -> None:
    """Create a user and print their API key (only the key, on stdout)."""
    if not 1 <= len(name) <= 100 or not name.isprintable():
        fail("NAME must be 1 to 100 printable characters", 2)

    async def run() -> str:
        async with Database(load_settings()) as database:
            await _require_migrated(database)
            try:
                return await create_user(database, name)
            except UniqueViolationError:
                fail(f"a user named {name!r} already exists; use add-key to give them a new key")

    typer.echo(asyncio.run(run()))


@app.command("purge-idempotency-keys")
def purge_idempotency_keys_command(
    older_than_hours: Annotated[
        float, typer.Option(min=1, help="Delete keys stored more than this many hours ago.")
    ] = 24,
) -> None:
    """Delete stored Idempotency-Key answers older than the window (run it from cron).

    A client repeating a request after the window gets a new write rather than a replay, so
    keep the window longer than any client's retries.
    """

    async def run() -> int:
        async with Database(load_settings()) as database:
            await _require_migrated(database)
            return await purge_idempotency_keys(database, timedelta(hours=older_than_hours))

    typer.echo(f"deleted {asyncio.run(run())} idempotency key(s)")


@app.command("add-key")
def add_key_command(
    name: Annotated[str, typer.Argument(help="An existing user's name.")],
) -> None:
    """Issue another API key for an existing user and print it."""

    async def run() -> str:
        async with Database(load_settings()) as database:
            await _require_migrated(database)
            return await issue_key(database, name)

    typer.echo(asyncio.run(run()))


class EventLoop(enum.StrEnum):
    """The event loops the demo can serve on."""

    ASYNCIO = "asyncio"
    UVLOOP = "uvloop"
    AUTO = "auto"

    @property
    def uvicorn_loop(self) -> str:
        """uvicorn's ``--loop`` for this choice: uvloop is Bastion's batch-accepting one."""
        if self is EventLoop.UVLOOP:
            return "bastion.event_loop:new_event_loop"
        return self.value

    @property
    def description(self) -> str:
        """What the demo's banner says about the loop."""
        if self is EventLoop.UVLOOP:
            return "uvloop, accepting connections in batches (bastion.event_loop)"
        if self is EventLoop.AUTO:
            return "uvicorn's choice (stock uvloop when installed)"
        return "asyncio's"


@app.command()
def demo(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    loop: Annotated[
        EventLoop,
        typer.Option(
            help="Event loop to serve on. uvloop is Bastion's, which accepts waiting "
            "connections in a batch as asyncio's does; 'auto' is uvicorn's choice, stock "
            "uvloop, which accepts one per loop turn (see README)."
        ),
    ] = EventLoop.ASYNCIO,
) -> None:
    """Migrate the database, issue a key for the user 'demo', and serve the API.

    Serves on asyncio's loop unless told otherwise. ``--loop uvloop`` serves on
    :mod:`bastion.event_loop`'s uvloop: stock uvloop (libuv 1.45 and later) accepts one new
    connection per turn of a busy loop, and at 64 fresh connections against the SQLite demo
    the last waited over a second to be accepted (bench/README.md, finding 31).
    """
    import uvicorn

    from conversations.app import create_app

    settings = load_settings()
    if settings.is_memory:
        fail(
            "the demo needs a database file or server: an in-memory SQLite database would "
            "vanish between migrating and serving (try DATABASE_URL=sqlite:///./data/demo.db)",
            2,
        )

    async def prepare() -> str:
        async with Database(settings) as database:
            await upgrade(database, MIGRATIONS)
            return await issue_key(database, "demo", create=True)

    key = asyncio.run(prepare())
    base = f"http://{host}:{port}"
    typer.echo(
        "\n".join(
            [
                "",
                f"Conversations demo on {settings.display_url}",
                f"  API:       {base}/v1/conversations",
                f"  Docs:      {base}/docs",
                f"  Demo key:  {key}",
                f"  Loop:      {loop.description}",
                "",
                "Try it:",
                f'  export KEY="{key}"',
                f"  curl -s -H \"Authorization: Bearer $KEY\" -H 'Content-Type: application/json' "
                f'-d \'{{"title": "Hello"}}\' {base}/v1/conversations',
                "",
            ]
        )
    )
    uvicorn.run(
        create_app(settings),
        host=host,
        port=port,
        loop=loop.uvicorn_loop,
        log_config=_log_config(),
    )


def _log_config() -> dict[str, Any]:
    """uvicorn's logging, with the request id on every line and Bastion's loggers shown."""
    from uvicorn.config import LOGGING_CONFIG

    install_request_id_logging()
    config = copy.deepcopy(LOGGING_CONFIG)
    config["formatters"]["default"]["fmt"] = (
        "%(levelprefix)s [%(request_id)s] %(name)s: %(message)s"
    )
    config["formatters"]["access"]["fmt"] = (
        '%(levelprefix)s [%(request_id)s] %(client_addr)s - "%(request_line)s" %(status_code)s'
    )
    config["loggers"]["bastion"] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    return config


def main() -> None:
    """Entry point of the ``conversations`` console script."""
    run_cli(app)
