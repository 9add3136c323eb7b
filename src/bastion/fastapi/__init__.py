"""FastAPI integration: lifespan, unit-of-work dependencies, error mapping, health.

>>> app = FastAPI(lifespan=database_lifespan(load_settings()))  # doctest: +SKIP
>>> install_error_handlers(app)
>>> app.include_router(create_health_router())
>>> @app.post("/notes", status_code=201)
... async def create_note(body: NoteIn, session: WriteSession) -> NoteOut:
...     note = Note(text=body.text)
...     session.add(note)
...     await session.flush()          # COMMIT follows, before the response is sent
...     return NoteOut.model_validate(note)
"""

from bastion.fastapi._admin import create_admin_router, require_admin
from bastion.fastapi._body_limit import BodySizeLimitMiddleware
from bastion.fastapi._cache import (
    CacheDep,
    CacheInvalidations,
    InvalidateAfterCommit,
    LiveHubDep,
    cache_of,
    live_hub_of,
)
from bastion.fastapi._dependencies import (
    DatabaseDep,
    ReadConnection,
    ReadSession,
    WriteConnection,
    WriteSession,
    database_of,
    enter_for_route,
    get_database,
)
from bastion.fastapi._errors import (
    HTTP_STATUS_BY_ERROR,
    RETRY_AFTER_S,
    error_response,
    install_error_handlers,
)
from bastion.fastapi._health import create_health_router
from bastion.fastapi._idempotency import IDEMPOTENCY_KEY_HEADER, REPLAYED_HEADER, idempotent_write
from bastion.fastapi._in_flight_limit import InFlightLimitMiddleware
from bastion.fastapi._lifespan import database_lifespan
from bastion.fastapi._metrics import create_metrics_router
from bastion.fastapi._request_context import REQUEST_ID_HEADER, RequestContextMiddleware
from bastion.fastapi._turn_budget import TurnBudgetMiddleware

__all__ = [
    "HTTP_STATUS_BY_ERROR",
    "IDEMPOTENCY_KEY_HEADER",
    "REPLAYED_HEADER",
    "REQUEST_ID_HEADER",
    "RETRY_AFTER_S",
    "BodySizeLimitMiddleware",
    "CacheDep",
    "CacheInvalidations",
    "DatabaseDep",
    "InFlightLimitMiddleware",
    "InvalidateAfterCommit",
    "LiveHubDep",
    "ReadConnection",
    "ReadSession",
    "RequestContextMiddleware",
    "TurnBudgetMiddleware",
    "WriteConnection",
    "WriteSession",
    "cache_of",
    "create_admin_router",
    "create_health_router",
    "create_metrics_router",
    "database_lifespan",
    "database_of",
    "enter_for_route",
    "error_response",
    "get_database",
    "idempotent_write",
    "install_error_handlers",
    "live_hub_of",
    "require_admin",
]
