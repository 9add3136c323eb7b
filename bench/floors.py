"""The ratios the reference service cannot beat: what its requests cost without a database.

``python -m bench.floors [--backend sqlite|postgresql] [--requests N]`` seeds a database (as
``make bench`` does) and sends the three requests of ``make bench``'s scenarios
(``get_conversation``, ``list_messages``, ``create_message``) straight into six ASGI apps, one
request at a time, with no sockets and no HTTP server, and prints CPU microseconds per request
(median of interleaved rounds):

* ``raw``, ``naive``: the baselines of ``make bench``; ``reference``: the reference service.
* ``raw_floor``: ``raw``'s routes with their driver calls replaced by their answers.
* ``reference_floor``: the reference routes' shape without a database: the same middleware,
  error handlers, dependency graph (``yield`` dependencies with ``scope="function"``),
  parameter and body validation, response models and headers; the answers are recorded
  from ``raw`` at the start.
* ``unit_floor``: ``reference_floor`` with the reference's units of work, opened and closed,
  and no statement in them: a read unit per read (opened in the read's one dependency, as
  ``CurrentReadCaller`` opens it); for a write, the retried, idempotency-aware write unit
  that also authenticates the caller (``write_once`` → ``idempotent_write`` →
  ``Database.run`` → ``write_connection``).

Were Bastion and SQLAlchemy free, a reference request would still cost ``reference_floor``
plus the database work ``raw`` does (``raw - raw_floor``); keeping a unit of work per request,
``unit_floor`` plus that work. So ``reference / raw`` can be at most ``raw`` divided by that
sum, and ``reference / naive`` at most ``naive`` divided by it.

How far these bounds carry to ``make bench``:

* In-process figures leave out the HTTP server's own work per request (H), the same for every
  variant. Under ``wrk`` a ratio to ``raw`` can reach ``(raw + H) / (least + H)``, a little
  more than printed; a ratio to ``naive`` only gets lower. H is measured separately (the
  README gives it: 44-57 us for uvicorn with uvloop and httptools on this machine).
* The floors leave out some of the reference's work that is not a statement: the cache
  decorators (a pass-through without ``REDIS_URL``), the live-event announcement after a
  write, and the routes Starlette tries before the matching one. That makes them lower, and
  the bounds looser, than they could be.
* ``unit_floor``'s write unit on SQLite runs ``BEGIN IMMEDIATE`` and ``COMMIT``, which
  ``raw - raw_floor`` counts as well: the create bounds on SQLite are low by that much.
"""

from __future__ import annotations

import json
import random
import statistics
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Final

from asgi_lifespan import LifespanManager
from fastapi import Depends, FastAPI, Request, Response
from fastapi.responses import JSONResponse
from sqlalchemy.ext.asyncio import AsyncConnection

from bastion import StoredResponse, load_settings
from bastion.fastapi import (
    BodySizeLimitMiddleware,
    DatabaseDep,
    RequestContextMiddleware,
    database_lifespan,
    database_of,
    install_error_handlers,
)
from bench.layers import (
    key_hash,
    measure_seeded,
    naive_app,
    parse_options,
    raw_app,
    reference_app,
)
from bench.run import MESSAGE_BODY
from conversations.auth import PresentedKey, WriteCaller, hash_api_key, key_guard_of
from conversations.routes._ids import parse_conversation_id
from conversations.routes.messages import PageCursor, PageLimit
from conversations.schemas import ConversationOut, MessageCreate, MessageOut, MessagePage

ROOT: Final = Path(__file__).resolve().parent.parent
ROUNDS: Final = 5
WARM_UP: Final = 100


@dataclass(frozen=True)
class Scenario:
    method: str
    suffix: str
    status: int
    body: bytes = b""


SCENARIOS: Final = {
    "get_conversation": Scenario("GET", "", 200),
    "list_messages": Scenario("GET", "/messages", 200),
    "create_message": Scenario("POST", "/messages", 201, MESSAGE_BODY.encode()),
}
ANSWERS: dict[str, Any] = {}
"""Each scenario's answer, as ``raw`` gave it: what the floors answer."""


# -- raw_floor: raw's routes, answered without the driver -------------------------------------


def raw_floor_app() -> FastAPI:
    app = FastAPI()

    @app.get("/v1/conversations/{conversation_id}")
    async def get_conversation(conversation_id: uuid.UUID, request: Request) -> Any:
        key_hash(request)
        return dict(ANSWERS["get_conversation"], id=str(conversation_id))

    @app.get("/v1/conversations/{conversation_id}/messages")
    async def list_messages(conversation_id: uuid.UUID, request: Request, limit: int = 20) -> Any:
        key_hash(request)
        return ANSWERS["list_messages"]

    @app.post("/v1/conversations/{conversation_id}/messages", status_code=201)
    async def create_message(conversation_id: uuid.UUID, request: Request) -> Any:
        key_hash(request)
        body = await request.json()
        return JSONResponse(dict(ANSWERS["create_message"], content=body["content"]), 201)

    return app


# -- reference_floor and unit_floor: the reference routes' shape -------------------------------


async def _no_reader(request: Request) -> AsyncIterator[uuid.UUID]:
    key_hash(request)
    yield uuid.UUID(int=2)


NoReader = Annotated[uuid.UUID, Depends(_no_reader, scope="function")]


async def _no_user(request: Request) -> uuid.UUID:
    key_hash(request)
    return uuid.UUID(int=2)


NoUser = Annotated[uuid.UUID, Depends(_no_user)]


async def _unit_reader(request: Request) -> AsyncIterator[uuid.UUID]:
    await _presented(request)
    async with database_of(request).read_connection():
        yield uuid.UUID(int=2)


UnitReader = Annotated[uuid.UUID, Depends(_unit_reader, scope="function")]


class _StatementlessCaller(WriteCaller):
    """A write's caller, taken as authenticated in the write unit without a statement."""

    async def authenticate(self, connection: AsyncConnection) -> uuid.UUID:
        return uuid.UUID(int=2)


async def _unit_caller(request: Request) -> WriteCaller:
    return _StatementlessCaller(await _presented(request))


async def _presented(request: Request) -> PresentedKey:
    """The request's key as the reference's dependencies take it: hashed, past the key guard,
    and reported good to it (as a lookup that found it would), so the guard lets it by. (The
    report hashes the key a second time, about 1 µs the reference does not spend.)"""
    key = request.headers["authorization"].partition(" ")[2]
    guard = key_guard_of(request)
    presented = await PresentedKey.admit(key, "floor", guard)
    guard.accepted(hash_api_key(key))
    return presented


UnitCaller = Annotated[WriteCaller, Depends(_unit_caller)]


def _conversation(conversation_id: str, response: Response) -> ConversationOut:
    conversation = ConversationOut.model_validate(
        dict(ANSWERS["get_conversation"], id=parse_conversation_id(conversation_id))
    )
    response.headers["ETag"] = f'"{conversation.version}"'
    return conversation


def _page(conversation_id: str) -> MessagePage:
    parse_conversation_id(conversation_id)
    answer = ANSWERS["list_messages"]
    return MessagePage(
        items=[MessageOut.model_validate(item) for item in answer["items"]],
        next_cursor=answer["next_cursor"],
        total=answer["total"],
    )


def _created(conversation_id: str, body: MessageCreate) -> StoredResponse:
    cid = parse_conversation_id(conversation_id)
    answer = ANSWERS["create_message"]
    message = MessageOut.model_validate(
        dict(answer, conversation_id=cid, content=body.content, role=body.role)
    )
    location = f"/v1/conversations/{cid}/messages/{message.id}"
    return StoredResponse.json(message, status_code=201, headers={"Location": location})


def _shaped_app(*, lifespan: Any = None) -> FastAPI:
    from conversations.app import MAX_BODY_BYTES, add_request_pacing

    app = FastAPI(lifespan=lifespan)
    install_error_handlers(app)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=MAX_BODY_BYTES)
    app.add_middleware(RequestContextMiddleware)
    # The reference's pacing too: one request at a time it only adds its own cost, but under
    # wrk (bench.floors_served) it decides how many requests run at once.
    add_request_pacing(app, load_settings())
    return app


def reference_floor_app() -> FastAPI:
    app = _shaped_app()

    @app.get("/v1/conversations/{conversation_id}")
    async def get_conversation(
        conversation_id: str, _user: NoReader, response: Response
    ) -> ConversationOut:
        return _conversation(conversation_id, response)

    @app.get("/v1/conversations/{conversation_id}/messages")
    async def list_messages(
        conversation_id: str,
        _user: NoReader,
        limit: PageLimit = 20,
        cursor: PageCursor = None,
    ) -> MessagePage:
        return _page(conversation_id)

    @app.post("/v1/conversations/{conversation_id}/messages", status_code=201)
    async def create_message(conversation_id: str, body: MessageCreate, _user: NoUser) -> Response:
        answer = _created(conversation_id, body)
        return Response(
            answer.body, 201, headers=dict(answer.headers), media_type="application/json"
        )

    return app


def unit_floor_app() -> FastAPI:
    from conversations.routes._writes import write_once

    app = _shaped_app(lifespan=database_lifespan(load_settings()))

    @app.get("/v1/conversations/{conversation_id}")
    async def get_conversation(
        conversation_id: str, _user: UnitReader, response: Response
    ) -> ConversationOut:
        return _conversation(conversation_id, response)

    @app.get("/v1/conversations/{conversation_id}/messages")
    async def list_messages(
        conversation_id: str,
        _user: UnitReader,
        limit: PageLimit = 20,
        cursor: PageCursor = None,
    ) -> MessagePage:
        return _page(conversation_id)

    @app.post("/v1/conversations/{conversation_id}/messages", status_code=201)
    async def create_message(
        conversation_id: str,
        body: MessageCreate,
        caller: UnitCaller,
        database: DatabaseDep,
        request: Request,
    ) -> Response:
        async def add(_connection: AsyncConnection, _user_id: uuid.UUID) -> StoredResponse:
            return _created(conversation_id, body)

        return await write_once(request, database, caller, add)

    return app


APPS: Final[dict[str, Callable[[], Any]]] = {
    "raw": raw_app,
    "naive": naive_app,
    "reference": reference_app,
    "raw_floor": raw_floor_app,
    "reference_floor": reference_floor_app,
    "unit_floor": unit_floor_app,
}

# -- measuring -----------------------------------------------------------------------------------


async def _send(app: Any, scenario: Scenario, conversation_id: str, key: str) -> bytes:
    """One request of ``scenario`` into ``app``; its response body.

    Raises:
        RuntimeError: the app answered with another status than the scenario's.
    """
    path = f"/v1/conversations/{conversation_id}{scenario.suffix}"
    headers = [(b"host", b"bench"), (b"authorization", f"Bearer {key}".encode())]
    if scenario.body:
        headers += [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(scenario.body)).encode()),
        ]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": scenario.method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"limit=20" if scenario.suffix else b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    statuses: list[int] = []
    body: list[bytes] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": scenario.body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])
        elif message["type"] == "http.response.body":
            body.append(message.get("body", b""))

    await app(scope, receive, send)
    if statuses != [scenario.status]:
        raise RuntimeError(f"{scenario.method} {path}: status {statuses}")
    return b"".join(body)


async def measure(workdir: Path, requests: int) -> dict[str, dict[str, float]]:
    """CPU microseconds per request, by scenario and app (medians of interleaved rounds)."""
    key = (workdir / "key.txt").read_text().strip()
    ids = (workdir / "ids.txt").read_text().split()
    chosen = [random.choice(ids) for _ in range(requests)]
    costs: dict[str, dict[str, list[float]]] = {s: {a: [] for a in APPS} for s in SCENARIOS}
    async with AsyncExitStack() as stack:
        apps = {}
        for name, make in APPS.items():
            app = make()
            await stack.enter_async_context(LifespanManager(app))
            apps[name] = app
        for scenario_name, scenario in SCENARIOS.items():
            ANSWERS[scenario_name] = json.loads(await _send(apps["raw"], scenario, ids[0], key))
        for _ in range(ROUNDS):
            for scenario_name, scenario in SCENARIOS.items():
                for name, app in apps.items():
                    for conversation_id in chosen[:WARM_UP]:  # pools filled, statements cached
                        await _send(app, scenario, conversation_id, key)
                    started = time.process_time()
                    for conversation_id in chosen:
                        await _send(app, scenario, conversation_id, key)
                    elapsed = time.process_time() - started
                    costs[scenario_name][name].append(elapsed / requests * 1e6)
    return {
        scenario: {name: statistics.median(values) for name, values in by_app.items()}
        for scenario, by_app in costs.items()
    }


def report(
    backend: str,
    costs: dict[str, dict[str, float]],
    title: str = "CPU us per request, in-process, sequential",
) -> list[str]:
    """The table of ``costs`` (us per request by scenario and app) and the bounds, as
    printed."""
    lines = [f"{backend}: {title}"]
    lines.append(f"  {'app':16}" + "".join(f"{scenario:>18}" for scenario in costs))
    for name in APPS:
        lines.append(f"  {name:16}" + "".join(f"{by_app[name]:18.0f}" for by_app in costs.values()))
    for scenario, cost in costs.items():
        raw, naive, reference = cost["raw"], cost["naive"], cost["reference"]
        database_work = raw - cost["raw_floor"]
        lines.append(
            f"  {scenario}: now reference/raw {raw / reference:.3f},"
            f" reference/naive {naive / reference:.2f}"
        )
        for floor in ("reference_floor", "unit_floor"):
            least = cost[floor] + database_work
            lines.append(
                f"    at best, {floor} + (raw - raw_floor) = {least:.0f} us:"
                f" reference/raw {raw / least:.3f}, reference/naive {naive / least:.2f}"
            )
    return lines


def main() -> None:
    options = parse_options(__doc__, default_requests=1000)
    costs = measure_seeded(options.backend, "bastion_floors", measure, options.requests)
    print("\n".join(report(options.backend, costs)))


if __name__ == "__main__":
    main()
