"""Per-request context, as pure ASGI middleware: request id, Server-Timing, N+1 warnings.

For each HTTP request the middleware

* takes the client's ``X-Request-ID`` if it is a sane token (else makes one), echoes it on
  the response, and makes it the ``request_id`` of every log record written meanwhile
  (:func:`~bastion.request_context.install_request_id_logging`);
* counts the request's statements and database time (Bastion's query events add to it) and
  reports them in a ``Server-Timing`` header: ``db;dur=3.21;desc="4 queries"``;
* warns (``bastion.n_plus_one``) when one statement fingerprint ran more than
  ``N_PLUS_ONE_THRESHOLD`` times in the request — the signature of a query in a loop.

Pure ASGI rather than ``BaseHTTPMiddleware``: it adds no task and no copy of the body.
"""

from __future__ import annotations

import logging
import re
from random import getrandbits
from typing import Final

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bastion.request_context import (
    RequestContext,
    enter_request,
    install_request_id_logging,
    leave_request,
)

__all__ = ["REQUEST_ID_HEADER", "RequestContextMiddleware"]

REQUEST_ID_HEADER: Final = "X-Request-ID"
_SANE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")

logger = logging.getLogger("bastion.n_plus_one")


class RequestContextMiddleware:
    """Request ids, ``Server-Timing`` and N+1 warnings for every HTTP request.

    ``n_plus_one_threshold``: repetitions of one statement in one request that are reported.
    """

    def __init__(self, app: ASGIApp, *, n_plus_one_threshold: int = 10) -> None:
        self.app = app
        self.n_plus_one_threshold = n_plus_one_threshold
        install_request_id_logging()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        context = RequestContext(
            request_id=_request_id_of(scope),
            route=f"{scope.get('method', '?')} {scope.get('path', '?')}",
        )

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers[REQUEST_ID_HEADER] = context.request_id
                # The statements that ran before the response started (all of them, for a
                # route whose units end before it returns, which Bastion's dependencies do).
                headers.append(
                    "Server-Timing",
                    f'db;dur={context.database_s * 1000:.2f};desc="{context.queries} queries"',
                )
            await send(message)

        token = enter_request(context)
        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            leave_request(token)
            self._warn_about_repeats(context, scope)

    def _warn_about_repeats(self, context: RequestContext, scope: Scope) -> None:
        route = scope.get("route")
        where = f"{scope.get('method', '?')} {getattr(route, 'path', scope.get('path', '?'))}"
        for statement, count in context.fingerprints.items():
            if count > self.n_plus_one_threshold:
                logger.warning(
                    "possible N+1: %d runs of one statement in %s [request_id=%s]: %s",
                    count,
                    where,
                    context.request_id,
                    statement,
                )


def _request_id_of(scope: Scope) -> str:
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            candidate: str = bytes(value).decode("latin-1")
            if _SANE_REQUEST_ID.match(candidate):
                return candidate
            break  # a hostile or malformed id is replaced, never echoed
    # 128 random bits from the PRNG, not uuid4's os.urandom: an id to correlate logs needs
    # uniqueness, not secrecy, and the system call showed in every request's profile.
    return f"{getrandbits(128):032x}"
