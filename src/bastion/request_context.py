"""What Bastion knows about the request being served: its id, its route, its queries.

Set by the ASGI middleware (:class:`bastion.fastapi.RequestContextMiddleware`) in a context
variable, so anything running for that request — a query event, a log record, the slow-query
log — can find it without being handed it. Outside a request there is none.
"""

from __future__ import annotations

import contextvars
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Final

__all__ = ["RequestContext", "current_request", "install_request_id_logging"]

NO_REQUEST: Final = "-"


@dataclass(slots=True)
class RequestContext:
    """One request: its id, a description of its route, and the statements it ran.

    ``user`` names who is acting, once the application has authenticated the caller; audit
    columns (:mod:`bastion.repository.audit`) record it.
    """

    request_id: str
    route: str
    user: str | None = None
    queries: int = 0
    database_s: float = 0.0
    fingerprints: Counter[str] = field(default_factory=Counter)

    def record_query(self, statement_fingerprint: str, duration_s: float) -> None:
        self.queries += 1
        self.database_s += duration_s
        self.fingerprints[statement_fingerprint] += 1


_current: contextvars.ContextVar[RequestContext | None] = contextvars.ContextVar(
    "bastion_request", default=None
)


def current_request() -> RequestContext | None:
    """The request being served in this task, if any."""
    return _current.get()


def enter_request(context: RequestContext) -> contextvars.Token[RequestContext | None]:
    """Make ``context`` current; give the token back to :func:`leave_request`."""
    return _current.set(context)


def leave_request(token: contextvars.Token[RequestContext | None]) -> None:
    _current.reset(token)


_installed = False


def install_request_id_logging() -> None:
    """Give every log record a ``request_id`` attribute (``-`` outside a request).

    Done with the record factory rather than a filter on some handler, so that every logger
    and handler — the application's, uvicorn's, libraries' — can use ``%(request_id)s``.
    Idempotent.
    """
    global _installed
    if _installed:
        return
    _installed = True
    previous = logging.getLogRecordFactory()

    def factory(*args: object, **kwargs: object) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        context = _current.get()
        record.request_id = context.request_id if context is not None else NO_REQUEST
        return record

    logging.setLogRecordFactory(factory)
