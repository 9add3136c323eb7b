"""Where a point read's time goes: the per-request CPU cost of each layer, measured in-process.

``python -m bench.layers [--backend sqlite|postgresql] [--requests N]`` seeds a database (as
``make bench`` does) and sends ``GET /v1/conversations/{id}`` straight into four ASGI apps, one
request at a time, with no sockets and no HTTP server, so that only the app's own work counts:

* ``raw``: the raw-driver baseline of ``make bench`` (FastAPI + sqlite3 / asyncpg).
* ``sqlalchemy``: the same two queries through a plain ``create_async_engine`` connection,
  the way most FastAPI services use SQLAlchemy's asyncio extension.
* ``bastion_unit``: the same through ``Database.read_connection()``.
* ``reference``: the reference service's route (dependencies, middleware, cache decorator,
  repository, response model).

* ``naive``: the tutorial baseline of ``make bench`` (``AsyncSession`` from a ``yield``
  dependency, ORM queries).

It prints CPU microseconds per request (median of interleaved rounds). The differences say
what each layer costs. What the framework alone costs, and so the best ratio each scenario of
``make bench`` could reach, is ``python -m bench.floors``'s to measure.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

from asgi_lifespan import LifespanManager
from fastapi import FastAPI, Request
from sqlalchemy import bindparam, select
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine

from bastion import Database, load_settings
from conversations.models import ApiKey, Conversation
from conversations.schemas import ConversationOut

ROOT = Path(__file__).resolve().parent.parent
MeasuredT = TypeVar("MeasuredT")
ROUNDS = 5


def _queries() -> tuple[Any, Any]:
    user = select(ApiKey.user_id).where(
        ApiKey.key_hash == bindparam("key_hash"), ApiKey.revoked_at.is_(None)
    )
    conversation = select(Conversation.__table__).where(
        Conversation.id == bindparam("cid"),
        Conversation.owner_id == bindparam("owner"),
        Conversation.deleted_at.is_(None),
    )
    return user, conversation


QUERIES: tuple[Any, Any] = _queries()


def key_hash(request: Request) -> str:
    """The stored hash of the request's Bearer key, as raw computes it."""
    return hashlib.sha256(request.headers["authorization"][7:].encode()).hexdigest()


async def _point_read(
    connection: AsyncConnection, request: Request, conversation_id: uuid.UUID
) -> ConversationOut:
    """The API-key check and the conversation read, as the reference route makes them."""
    user_query, conversation_query = QUERIES
    owner = await connection.scalar(user_query, {"key_hash": key_hash(request)})
    found = await connection.execute(conversation_query, {"cid": conversation_id, "owner": owner})
    return ConversationOut.model_validate(found.mappings().one())


def sqlalchemy_app() -> FastAPI:
    engine = create_async_engine(load_settings().url, pool_size=8)
    app = FastAPI()

    @app.get("/v1/conversations/{conversation_id}")
    async def get(conversation_id: uuid.UUID, request: Request) -> ConversationOut:
        async with engine.connect() as connection:
            return await _point_read(connection, request, conversation_id)

    return app


def bastion_unit_app() -> FastAPI:
    database = Database(load_settings())

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        async with database:
            yield

    app = FastAPI(lifespan=lifespan)

    @app.get("/v1/conversations/{conversation_id}")
    async def get(conversation_id: uuid.UUID, request: Request) -> ConversationOut:
        async with database.read_connection() as connection:
            return await _point_read(connection, request, conversation_id)

    return app


def raw_app() -> Any:
    import bench.apps.raw

    return bench.apps.raw.app


def reference_app() -> Any:
    from conversations.app import create_app

    return create_app()


def naive_app() -> Any:
    import bench.apps.naive

    return bench.apps.naive.app


APPS: dict[str, Callable[[], Any]] = {
    "raw": raw_app,
    "sqlalchemy": sqlalchemy_app,
    "bastion_unit": bastion_unit_app,
    "reference": reference_app,
    "naive": naive_app,
}


async def _get(app: Any, path: str, key: str) -> None:
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"bench"), (b"authorization", f"Bearer {key}".encode())],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    statuses: list[int] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    await app(scope, receive, send)
    if statuses != [200]:
        raise RuntimeError(f"{path}: status {statuses}")


async def measure(workdir: Path, requests: int) -> dict[str, float]:
    key = (workdir / "key.txt").read_text().strip()
    ids = (workdir / "ids.txt").read_text().split()
    paths = [f"/v1/conversations/{random.choice(ids)}" for _ in range(requests)]
    costs: dict[str, list[float]] = {name: [] for name in APPS}
    async with AsyncExitStack() as stack:
        apps = {}
        for name, make in APPS.items():
            app = make()
            await stack.enter_async_context(LifespanManager(app))
            apps[name] = app
        for _ in range(ROUNDS):
            for name, app in apps.items():
                for path in paths[:200]:  # warm up: pools filled, statements cached
                    await _get(app, path, key)
                started = time.process_time()
                for path in paths:
                    await _get(app, path, key)
                costs[name].append((time.process_time() - started) / requests * 1e6)
    return {name: statistics.median(values) for name, values in costs.items()}


def measure_seeded(
    backend: str,
    name: str,
    measure: Callable[[Path, int], Coroutine[Any, Any, MeasuredT]],
    requests: int,
) -> MeasuredT:
    """Seed a database as ``make bench`` does (``name``: its PostgreSQL database, dropped
    after) and run ``measure(workdir, requests)`` on uvloop, with the environment pointing at it.

    Raises:
        subprocess.CalledProcessError: seeding failed.
    """
    with tempfile.TemporaryDirectory(prefix=f"{name}-") as tmp:
        workdir = Path(tmp)
        if backend == "postgresql":
            from bench.run import create_postgres_database, drop_postgres_database

            url = asyncio.run(create_postgres_database(name))
        else:
            url = f"sqlite:///{workdir}/{name}.db"
        os.environ.update(DATABASE_URL=url, BENCH_DATABASE_URL=url, DB_POOL_SIZE="8")
        try:
            subprocess.run([sys.executable, "-m", "bench.seed", str(workdir)], cwd=ROOT, check=True)
            import uvloop

            return uvloop.run(measure(workdir, requests))
        finally:
            if backend == "postgresql":
                asyncio.run(drop_postgres_database(name))


def parse_options(doc: str, default_requests: int) -> argparse.Namespace:
    """``--backend`` and ``--requests``, the options of both in-process tools (this and
    ``bench.floors``), described by the first paragraph of ``doc``."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--backend", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--requests", type=int, default=default_requests)
    return parser.parse_args()


def main() -> None:
    options = parse_options(__doc__, default_requests=2000)
    costs = measure_seeded(options.backend, "bastion_layers", measure, options.requests)
    raw = costs["raw"]
    print(f"{options.backend}: CPU per GET /v1/conversations/{{id}}, in-process, sequential")
    for name, cost in costs.items():
        print(f"  {name:13} {cost:7.0f} us   {cost / raw:5.2f} x raw   raw/this {raw / cost:5.3f}")


if __name__ == "__main__":
    main()
