"""The reference service with the after-commit hook the message route will call itself.

Until the integrator adds ``await message_created(request, user_id, response)`` to
``create_message`` (and ``messages_created`` to ``create_messages``), this test-only app calls
them from a middleware: after a ``POST …/messages`` answered 201 or 207 (its transaction
committed) and before the response is sent — exactly where the routes will. The tests start
it as ``uvicorn tests.live.hooked_app:create_app --factory``.
"""

from __future__ import annotations

import re
import uuid
from typing import Any

from fastapi import FastAPI
from starlette.requests import HTTPConnection
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bastion.fastapi._dependencies import database_of
from conversations.app import create_app as create_service
from conversations.auth import user_for_key
from conversations.live_events import message_created, messages_created

_MESSAGES = re.compile(r"^/v1/conversations/([^/]+)/messages(:batch)?$")


class AnnounceMessages:
    """Calls the hooks after ``POST /v1/conversations/{id}/messages`` (and ``:batch``)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        matched = _MESSAGES.match(scope["path"]) if scope["type"] == "http" else None
        if matched is None or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        held: list[Message] = []

        async def hold(message: Message) -> None:
            held.append(message)

        await self.app(scope, receive, hold)
        start = held[0]
        body = b"".join(m.get("body", b"") for m in held[1:])
        if start["status"] in (201, 207):
            connection = HTTPConnection(scope)
            headers = {k.decode(): v.decode() for k, v in start["headers"]}
            headers.pop("content-length", None)
            response = Response(body, status_code=start["status"], headers=headers)
            key = connection.headers["authorization"].partition(" ")[2].strip()
            async with database_of(connection).read_connection() as db:
                owner_id = await user_for_key(db, key)
            assert owner_id is not None
            if matched.group(2):
                cid = uuid.UUID(matched.group(1))
                await messages_created(connection, owner_id, cid, response)
            else:
                await message_created(connection, owner_id, response)
        for message in held:
            await send(message)


def create_app(**kwargs: Any) -> FastAPI:
    app = create_service(**kwargs)
    app.add_middleware(AnnounceMessages)
    return app
