"""Bastion errors → HTTP responses, installed on an app with :func:`install_error_handlers`.

Every error body has the same shape, ``{"detail": …, "code": …}``: ``detail`` is a message
(or, for invalid requests, a list of ``{loc, msg, type}``) and ``code`` a stable name. Bodies
never echo the input or carry SQL, parameters or driver messages.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any, Final

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from bastion.backup.errors import BackupIntegrityError, BackupStoreError, RestoreInProgressError
from bastion.errors import (
    BastionError,
    CircuitOpenError,
    CommitOutcomeUnknownError,
    ConfirmationRequiredError,
    DatabaseStateError,
    DatabaseUnavailableError,
    IntegrityViolationError,
    NotFoundError,
    OverloadedError,
    QueryError,
    StaleVersionError,
    StatementTimeoutError,
    TransactionConflictError,
    UniqueViolationError,
)
from bastion.idempotency import IdempotencyKeyReusedError
from bastion.jobs import JobConflictError
from bastion.maintenance.errors import MaintenanceError
from bastion.repository import InvalidQueryError

__all__ = ["HTTP_STATUS_BY_ERROR", "RETRY_AFTER_S", "error_response", "install_error_handlers"]

RETRY_AFTER_S: Final = 1
"""Seconds a client is told to wait (``Retry-After``) after a 503."""

# Most specific first: the first class the error is an instance of decides.
HTTP_STATUS_BY_ERROR: Final[Mapping[type[BastionError], int]] = {
    NotFoundError: 404,
    StaleVersionError: 412,
    UniqueViolationError: 409,
    IdempotencyKeyReusedError: 422,
    JobConflictError: 409,
    RestoreInProgressError: 409,
    ConfirmationRequiredError: 400,
    BackupIntegrityError: 422,
    MaintenanceError: 422,
    BackupStoreError: 503,
    IntegrityViolationError: 422,
    DatabaseUnavailableError: 503,
    OverloadedError: 503,
    TransactionConflictError: 503,
    StatementTimeoutError: 503,
    # Not 503: a client told to retry would repeat a write that may already have landed.
    CommitOutcomeUnknownError: 500,
    DatabaseStateError: 503,
    QueryError: 500,
}

_GENERIC_500 = "internal error"
_MAX_LOCATION_PART = 64

logger = logging.getLogger("bastion.fastapi")


def error_response(error: BastionError) -> JSONResponse:
    """The response for ``error``: its status, code and message (``Retry-After`` on 503)."""
    status = next(
        (status for kind, status in HTTP_STATUS_BY_ERROR.items() if isinstance(error, kind)),
        500,
    )
    # A query error is our defect and its message may describe internals: the client gets
    # none. Every other message is written for clients.
    detail = _GENERIC_500 if isinstance(error, QueryError) else error.message
    headers = {"Retry-After": str(_retry_after_s(error))} if status == 503 else None
    return JSONResponse({"detail": detail, "code": error.code}, status, headers=headers)


def _retry_after_s(error: BastionError) -> int:
    if isinstance(error, CircuitOpenError):
        # When the breaker will next let a request through: retrying sooner is refused anyway.
        return max(RETRY_AFTER_S, math.ceil(error.retry_after_s))
    return RETRY_AFTER_S


async def _bastion_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, BastionError)
    response = error_response(exc)
    route = f"{request.method} {request.url.path}"
    if response.status_code == 503:
        logger.warning("%s answered 503: %s (%s)", route, exc.message, exc.code)
    elif response.status_code >= 500:
        # The client sees only "internal error"; the cause must reach the operator.
        logger.error("%s failed: %s", route, exc.message, exc_info=exc)
    return response


async def _invalid_query_handler(_request: Request, exc: Exception) -> Response:
    # A repository refused a sort, filter or cursor: the client's input, answered like any
    # other invalid request (the message never quotes the refused value).
    assert isinstance(exc, InvalidQueryError)
    detail = [{"loc": ["query", exc.parameter], "msg": exc.message, "type": "value_error"}]
    return JSONResponse({"detail": detail, "code": "validation_error"}, 422)


async def _validation_error_handler(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    fields = [_describe_field_error(error) for error in exc.errors()]
    return JSONResponse({"detail": fields, "code": "validation_error"}, 422)


def _describe_field_error(error: Mapping[str, Any]) -> dict[str, Any]:
    # "input" and "ctx" are dropped: they echo what the client sent (possibly huge or hostile).
    # Locations can hold client-chosen keys (an unknown field), so long ones are cut short.
    location = [
        part[: _MAX_LOCATION_PART - 1] + "…"
        if isinstance(part, str) and len(part) > _MAX_LOCATION_PART
        else part
        for part in error.get("loc", ())
    ]
    return {"loc": location, "msg": error.get("msg"), "type": error.get("type")}


_HTTP_CODES: Final[Mapping[int, str]] = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    412: "precondition_failed",
    413: "request_too_large",
    422: "validation_error",
    429: "too_many_requests",
}


async def _http_error_handler(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 400 and isinstance(exc.__cause__, ValueError):
        # FastAPI turns only JSONDecodeError into a 422; a body that is not UTF-8, or holds a
        # number Python refuses to parse, reaches us as a 400 caused by another ValueError.
        detail = [{"loc": ["body"], "msg": "body is not valid JSON", "type": "json_invalid"}]
        return JSONResponse({"detail": detail, "code": "validation_error"}, 422)
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    return JSONResponse({"detail": exc.detail, "code": code}, exc.status_code, headers=exc.headers)


def install_error_handlers(app: FastAPI) -> None:
    """Give every error the same JSON shape: Bastion errors, invalid requests, HTTP errors."""
    app.add_exception_handler(BastionError, _bastion_error_handler)
    app.add_exception_handler(RequestValidationError, _validation_error_handler)
    app.add_exception_handler(InvalidQueryError, _invalid_query_handler)
    app.add_exception_handler(StarletteHTTPException, _http_error_handler)
