"""A client that may hang up while its request waits, for the middlewares that hold requests
back (the in-flight limit, the turn budget)."""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.types import ASGIApp, Scope


class Client:
    """The server's side of one bodiless request whose client may leave: ``receive`` gives
    the request, then waits, as a server's does, until the client leaves (``leave``), and
    then says so at once."""

    def __init__(self, path: str, body: bytes = b"") -> None:
        headers = [(b"content-length", str(len(body)).encode())] if body else []
        self.scope: Scope = {"type": "http", "method": "POST", "path": path, "headers": headers}
        self.sent: list[dict[str, Any]] = []
        self._body = body
        self._left = asyncio.Event()
        self._request_given = False

    async def receive(self) -> dict[str, Any]:
        if not self._request_given:
            self._request_given = True
            return {"type": "http.request", "body": self._body, "more_body": False}
        await self._left.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)

    def leave(self) -> None:
        self._left.set()

    async def request(self, app: ASGIApp) -> None:
        await app(self.scope, self.receive, self.send)
