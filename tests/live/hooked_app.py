"""The reference service with the after-commit hook the message route will call itself.

Until the integrator adds ``await message_created(request, user_id, response)`` to
``create_message``, this test-only app calls it from a middleware: after a ``POST
…/messages`` answered 201 (its transaction committed) and before the response is sent —
exactly where the route will. Started by the tests as ``uvicorn tests.live.hooked_app:create_app
--factory``.
"""

from __future__ import annotations

import re
from typing import Any

from fastapi import FastAPI
from starlette.requests import HTTPConnection
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bastion.fastapi._dependencies import database_of
from conversations.app import create_app as create_service
from conversations.auth import user_for_key
from conversations.live_events import message_created

_MESSAGES = re.compile(r"^/v1/conversations/[^/]+/messages$")


class AnnounceMessages:
    """Calls :func:`message_created` for each 201 of ``POST /v1/conversations/{id}/messages``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not (
            scope["type"] == "http" and scope["method"] == "POST" and _MESSAGES.match(scope["path"])
        ):
            await self.app(scope, receive, send)
            return
        held: list[Message] = []

        async def hold(message: Message) -> None:
            held.append(message)

        await self.app(scope, receive, hold)
        start = held[0]
        body = b"".join(m.get("body", b"") for m in held[1:])
        if start["status"] == 201:
            connection = HTTPConnection(scope)
            headers = {k.decode(): v.decode() for k, v in start["headers"]}
            headers.pop("content-length", None)
            response = Response(body, status_code=201, headers=headers)
            key = connection.headers["authorization"].partition(" ")[2].strip()
            async with database_of(connection).read_connection() as db:
                owner_id = await user_for_key(db, key)
            assert owner_id is not None
            await message_created(connection, owner_id, response)
        for message in held:
            await send(message)


def create_app(**kwargs: Any) -> FastAPI:
    app = create_service(**kwargs)
    app.add_middleware(AnnounceMessages)
    return app
