"""Per-request context: the request id, the timing and the status of every answer.

One pure ASGI middleware wraps the whole app (a `BaseHTTPMiddleware` would add a task and a
stream per request). For every request it

* takes `X-Request-ID` from the request, or lets the route take the body's `request_id`, or
  makes one, and returns it as a response header on every answer, errors included;
* answers an exception nothing else handled with a JSON 500 that carries the request id, and
  logs it once with that id;
* times POST /score into `ctr_request_seconds{variant,status}`, 500s included, and counts
  refusals (`ctr_rejected_total`) and clients that left mid-body
  (`ctr_client_disconnects_total`, status 499 in the histogram), which are not errors of the
  service and are not logged as such.
"""

from __future__ import annotations

import contextvars
import os
import time
from typing import Any

from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import ClientGone, internal_error_response, log_unexpected
from service.metrics import Metrics

MAX_REQUEST_ID = 128
_HEADER = b"x-request-id"

# The id of the request being served, for log lines written deep in the request path.
request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("ctr_request_id", default=None)


def valid_request_id(value: Any) -> bool:
    """Printable ASCII without spaces, 1..128 chars: safe to echo in a header and a log line."""
    return isinstance(value, str) and 0 < len(value) <= MAX_REQUEST_ID and value.isascii() and value.isprintable() and " " not in value


class RequestContext:
    """What the route tells the middleware about one request (kept in scope["ctr"])."""

    __slots__ = ("_id", "variant", "rejected", "t0", "ticket")

    def __init__(self, request_id: str | None, t0: float) -> None:
        self._id = request_id
        self.variant = "none"  # the A/B arm, once assigned
        self.rejected: str | None = None  # the 503 reason, when refused
        self.t0 = t0
        self.ticket: Any = None  # the admission ticket of a POST /score (service/admission.py)

    @property
    def request_id(self) -> str:
        if self._id is None:
            self._id = os.urandom(16).hex()  # as random as uuid4().hex, a quarter of its cost
            request_id_var.set(self._id)
        return self._id

    @property
    def given(self) -> bool:
        return self._id is not None

    def adopt(self, request_id: str | None) -> str:
        """The body's request_id, used when the header gave none; returns the id in force."""
        if self._id is None and request_id is not None and valid_request_id(request_id):
            self._id = request_id
            request_id_var.set(request_id)
        return self.request_id


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, metrics: Metrics, timed_path: str = "/score") -> None:
        self.app = app
        self.metrics = metrics
        self.timed_path = timed_path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        given = None
        for name, value in scope["headers"]:
            if name == _HEADER:
                text = value.decode("latin-1")
                given = text if valid_request_id(text) else None
                break
        ctx = RequestContext(given, t0)
        scope["ctr"] = ctx
        token = request_id_var.set(given)
        status = 0

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", ()), (_HEADER, ctx.request_id.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except (ClientDisconnect, ClientGone):
            status = 499
            self.metrics.client_disconnects.inc()
        except Exception as exc:
            log_unexpected(exc, ctx.request_id, scope.get("path", ""))
            if status == 0:  # nothing sent yet: the client still gets JSON with the request id
                await internal_error_response(ctx.request_id)(scope, receive, send_with_id)
            status = 500
        finally:
            request_id_var.reset(token)
            if scope.get("path") == self.timed_path:
                m = self.metrics
                m.request_seconds.labels(ctx.variant, str(status or 500)).observe(time.perf_counter() - t0)
                if ctx.rejected is not None:
                    m.rejected.labels(ctx.variant, ctx.rejected).inc()
