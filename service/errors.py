"""Typed request errors and the one place that turns them into HTTP answers.

Each stage of the request path raises the error that says what went wrong (a bad field, an
unknown variant, no room in the queue); `install` registers one handler that maps them all
to a status, a JSON body and the headers the status promises (Retry-After on every 503,
Connection: close when the body was not read to its end). The route code never builds an
error response itself, so a status cannot drift from its body or its headers.

Errors of other modules are mapped here too, by type, so those modules stay free of HTTP:
`service.ab.UnknownVariant` and `service.registry.UnknownModel` are 404s,
`service.batcher.Overloaded` is a 503 and `model.spec.SpecError` a 422.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response

from model.logs import kv
from model.spec import SpecError
from service import batcher
from service.ab import UnknownVariant
from service.registry import UnknownModel

log = logging.getLogger("service")

RETRY_AFTER_S = "1"


class ServiceError(Exception):
    """An answer other than 200; `status`, `detail` and `headers` are what the client gets."""

    status = 500

    def __init__(self, detail: Any, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail if isinstance(detail, str) else repr(detail))
        self.detail = detail
        self.headers = headers


class BadRequest(ServiceError):
    """422: the body is not a valid request; `detail` is a list of {loc, msg, type}."""

    status = 422

    @classmethod
    def at(cls, loc: list[Any], msg: str, type_: str = "value_error") -> "BadRequest":
        return cls([{"loc": loc, "msg": msg, "type": type_}])


class PayloadTooLarge(ServiceError):
    """413, refused before the rest of the body is read, so the connection is closed."""

    status = 413

    def __init__(self, limit: int) -> None:
        super().__init__([{"loc": ["body"], "msg": f"body exceeds {limit} bytes", "type": "too_large"}], {"Connection": "close"})


class UnsupportedMediaType(ServiceError):
    status = 415


class BodyTimeout(ServiceError):
    """408: the body did not arrive within the limit; the half-read connection is closed."""

    status = 408

    def __init__(self, seconds: float) -> None:
        super().__init__(f"request body not received within {seconds:g} s", {"Connection": "close"})


class NotFound(ServiceError):
    status = 404


class Unauthorized(ServiceError):
    status = 401

    def __init__(self) -> None:
        super().__init__("missing or invalid bearer token", {"WWW-Authenticate": "Bearer"})


class Overloaded(ServiceError):
    """503 + Retry-After; `reason` is the ctr_rejected_total label."""

    status = 503

    def __init__(self, reason: str, detail: str | None = None) -> None:
        super().__init__(detail or f"overloaded: {reason}", {"Retry-After": RETRY_AFTER_S})
        self.reason = reason


class ClientGone(Exception):
    """The client went away before its body arrived: there is nobody to answer."""


def json_response(status: int, body: Any, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json", headers=headers)


def as_service_error(exc: Exception) -> ServiceError | None:
    """The typed error for `exc`, translating other modules' exceptions; None if unexpected."""
    if isinstance(exc, ServiceError):
        return exc
    if isinstance(exc, batcher.Overloaded):
        return Overloaded(exc.reason)
    if isinstance(exc, UnknownVariant):
        return NotFound(f"unknown variant '{exc}'")
    if isinstance(exc, UnknownModel):
        return NotFound(f"variant '{exc}' has no model loaded")
    if isinstance(exc, SpecError):
        return BadRequest.at(["body"], str(exc))
    return None


def error_response(exc: ServiceError) -> Response:
    return json_response(exc.status, {"detail": exc.detail}, exc.headers)


def internal_error_response(request_id: str) -> Response:
    return json_response(500, {"detail": "internal error", "request_id": request_id})


def answer(err: ServiceError, scope: dict[str, Any]) -> Response:
    """The response for `err`; a refusal's reason is noted for ctr_rejected_total."""
    if isinstance(err, Overloaded):
        ctx = scope.get("ctr")
        if ctx is not None:
            ctx.rejected = err.reason
    return error_response(err)


def install(app: FastAPI) -> None:
    """Register the handler for every typed error on `app` (FastAPI's exception handlers)."""

    async def handle(request: Request, exc: Exception) -> Response:
        err = as_service_error(exc)
        assert err is not None
        return answer(err, request.scope)

    for exc_type in (ServiceError, batcher.Overloaded, UnknownVariant, UnknownModel, SpecError):
        app.add_exception_handler(exc_type, handle)


def log_unexpected(exc: BaseException, request_id: str, path: str) -> None:
    log.error("request_failed %s", kv(request_id=request_id, path=path, error=f"{type(exc).__name__}: {str(exc)[:300]}"), exc_info=exc)
