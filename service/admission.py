"""Admission control: decide to shed a request before any work is spent on it.

`AdmissionGate` is an ASGI middleware in front of the router: a POST /score gets a `Ticket`,
or its 503 (or 415/413 when its headers alone rule it out), before FastAPI routes it, so a
refusal costs a header scan, not routing, a body read and a parse; under a retry storm the
CPU a refusal does not burn is what the admitted requests get.

A 503 is only cheap if it comes first: once a body is parsed and its features fetched, most
of the request's CPU is spent, and an overloaded event loop makes the refusal itself slow
(the old check in the batcher answered most 503s after 5-12 s at 200 clients x 500 items).
So the score route asks here before it reads its body, with what it knows then: the
Content-Length, from which its rows are estimated (bytes per item as measured on the bodies
parsed so far), and what is already admitted.

A request is refused when

* `max_inflight_requests` are already in flight (bounds memory: each holds its body);
* its rows would take the admitted rows past the row limit: at most `max_inflight_rows`
  (default: the batcher's queue bound, which would refuse them later anyway, after the work),
  halved each time an admitted request still times out in the queue and grown again by a
  tenth of each scored request's rows (additive increase, multiplicative decrease, as TCP
  does), so the limit settles where admitted requests meet their deadline even when the
  event loop, not the model, is what is slow;
* the wait it would see, the admitted rows ahead of it divided by the measured completion
  rate (rows/s, averaged over windows that kept two or more requests in flight, i.e. at
  capacity), passes `max_wait_s` (default: the batcher's queue deadline), so what is admitted
  can finish instead of timing out in the queue after its work was spent.

Once parsed, a request's estimate is replaced by its real row count. The limits are per
process: each worker has its own event loop, batcher and admission.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from typing import TYPE_CHECKING, Any

from starlette.types import ASGIApp, Receive, Scope, Send

from service.errors import Overloaded, PayloadTooLarge, ServiceError, UnsupportedMediaType, answer

if TYPE_CHECKING:
    from service.config import LimitsConfig

_RATE_WINDOW_S = 0.25  # completion rate sample length (busy time)
_RATE_ALPHA = 0.3  # weight of the newest sample in the rate's moving average
_BYTES_ALPHA = 0.05
MIN_INFLIGHT = 2  # always admitted up to this many requests in flight
_INCREASE = 0.1  # the row limit grows by this share of each scored request's rows


@dataclass
class Admission:
    max_inflight_requests: int
    max_inflight_rows: int
    max_wait_s: float
    max_items: int
    inflight_requests: int = 0
    inflight_rows: int = 0
    bytes_per_item: float = 16.0  # low on purpose until measured: rows are over-estimated
    rate: float | None = None  # rows/s completed while busy
    clock: Callable[[], float] = field(default=time.monotonic, repr=False)
    _done_rows: int = field(default=0, repr=False)
    _busy_s: float = field(default=0.0, repr=False)
    _area: float = field(default=0.0, repr=False)  # integral of requests in flight over busy time
    _last: float = field(default=0.0, repr=False)
    row_limit: float = field(default=0.0)  # adaptive, at most max_inflight_rows
    # Called with (row_limit, rate) whenever either moves: the service exports both as gauges.
    on_change: Callable[[float, float | None], None] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.row_limit = float(self.max_inflight_rows)

    def admit(self, content_length: int | None) -> "Ticket":
        """A ticket for one request, or Overloaded (503) if it cannot be served in time."""
        if self.inflight_requests >= self.max_inflight_requests:
            raise Overloaded("inflight_requests")
        rows = self.estimate_rows(content_length)
        ahead = self.inflight_rows + rows
        # Below MIN_INFLIGHT nothing waits long, and the pipe stays busy enough to measure
        # the rate again (a rate measured too low must not lock the door for good).
        if self.inflight_requests >= MIN_INFLIGHT:
            if ahead > self.row_limit:
                raise Overloaded("inflight_rows")
            if self.rate and self.inflight_rows / self.rate > self.max_wait_s:
                raise Overloaded("queue_wait")
        self._tick(self.clock())
        self.inflight_requests += 1
        self.inflight_rows += rows
        return Ticket(self, rows)

    def estimate_rows(self, content_length: int | None) -> int:
        if content_length is None:
            return self.max_items
        return max(1, min(self.max_items, int(content_length / self.bytes_per_item)))

    def learn_body(self, nbytes: int, items: int) -> None:
        if items:
            self.bytes_per_item += _BYTES_ALPHA * (nbytes / items - self.bytes_per_item)

    def wait_estimate_s(self) -> float | None:
        """Seconds a request arriving now would wait behind the admitted rows (None: no rate yet)."""
        return self.inflight_rows / self.rate if self.rate else None

    def _tick(self, now: float) -> None:
        """Account the time since the last admit/release (busy time, and requests x time)."""
        dt = now - self._last
        self._last = now
        if self.inflight_requests:
            self._busy_s += dt
            self._area += self.inflight_requests * dt

    def _release(self, rows: int, done: bool, expired: bool) -> None:
        now = self.clock()
        self._tick(now)
        self.inflight_requests -= 1
        self.inflight_rows -= rows
        limit, rate = self.row_limit, self.rate
        if done:
            self._done_rows += rows
            self.row_limit = min(float(self.max_inflight_rows), self.row_limit + _INCREASE * rows)
        elif expired:  # admitted but timed out in the queue: far too much was let in
            self.row_limit = max(1.0, self.row_limit / 2)
        if self._busy_s >= _RATE_WINDOW_S:
            # Only a window that kept requests queued measures capacity; one request at a
            # time measures that request's latency, which would make the rate far too low.
            if self._area / self._busy_s >= MIN_INFLIGHT:
                sample = self._done_rows / self._busy_s
                self.rate = sample if self.rate is None else self.rate + _RATE_ALPHA * (sample - self.rate)
            self._done_rows, self._busy_s, self._area = 0, 0.0, 0.0
        if self.on_change is not None and (self.row_limit != limit or self.rate != rate):
            self.on_change(self.row_limit, self.rate)


class Ticket:
    """One admitted request's share of the limits; `close` hands it back (exactly once)."""

    __slots__ = ("_adm", "rows", "done", "expired", "_open")

    def __init__(self, adm: Admission, rows: int) -> None:
        self._adm = adm
        self.rows = rows
        self.done = False  # scored: its rows count towards the completion rate
        self.expired = False  # its deadline passed in the batcher's queue
        self._open = True

    def set_rows(self, rows: int) -> None:
        """Replace the estimate by the parsed row count."""
        self._adm.inflight_rows += rows - self.rows
        self.rows = rows

    def close(self) -> None:
        if self._open:
            self._open = False
            self._adm._release(self.rows, self.done, self.expired)

    def __enter__(self) -> "Ticket":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_headers(scope: Scope, limits: "LimitsConfig") -> int | None:
    """The Content-Length, after refusing what the headers alone rule out (415, 413)."""
    length = None
    media = encoding = None
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                length = int(value)
            except ValueError:
                length = None
        elif name == b"content-type":
            media = value
        elif name == b"content-encoding":
            encoding = value
    if media is None or not _is_json(media):
        raise UnsupportedMediaType(f"Content-Type must be application/json, got {media.decode('latin-1') if media else 'none'}")
    if encoding is not None and encoding.strip().lower() != b"identity":
        raise UnsupportedMediaType(f"Content-Encoding {encoding.decode('latin-1')} is not supported: send the JSON as is")
    if length is not None and length > limits.max_body_bytes:
        raise PayloadTooLarge(limits.max_body_bytes)
    return length


def _is_json(media: bytes) -> bool:
    kind, _, params = media.partition(b";")
    if kind.strip().lower() != b"application/json":
        return False
    for param in params.split(b";"):
        key, _, val = param.partition(b"=")
        if key.strip().lower() == b"charset" and val.strip().strip(b'"').lower() not in (b"utf-8", b"utf8"):
            return False
    return True


class AdmissionGate:
    """ASGI middleware: POST `path` runs only with a ticket, kept in scope["ctr"].ticket and
    handed back when the request ends, however it ends."""

    def __init__(self, app: ASGIApp, admission: Admission, limits: "LimitsConfig", path: str = "/score") -> None:
        self.app = app
        self.admission = admission
        self.limits = limits
        self.path = path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != self.path or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        try:
            ticket = self.admission.admit(check_headers(scope, self.limits))
        except ServiceError as err:
            return await answer(err, scope)(scope, receive, send)
        ctx: Any = scope["ctr"]
        ctx.ticket = ticket
        try:
            await self.app(scope, receive, send)
        finally:
            ticket.close()
