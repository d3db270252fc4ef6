"""POST /score: one request read as a pipeline, each stage one call.

    (admit) -> read -> parse -> assign -> fetch -> encode -> batch -> respond

Every stage raises a typed error (service/errors.py) instead of answering itself; one handler
turns those into statuses. Admission is decided before the route runs, by the gate in
service/admission.py: an overloaded service refuses at the cost of reading a few headers, not
of routing, reading and parsing the body. The model version is resolved
after the fetch, and encode and submit run with no await between them, so a hot swap can
never pair one version's tokens with another version's session.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response

from model.logs import kv
from service.batcher import Overloaded as QueueOverloaded
from service.encoding import Missing
from service.errors import BodyTimeout, ClientGone, Overloaded, PayloadTooLarge
from service.features import Fetched
from service.registry import LoadedModel
from service.schemas import ScoreRequest, parse_request
from service.test_time import score_tokens

if TYPE_CHECKING:
    from service.admission import Ticket
    from service.app import Service
    from service.config import LimitsConfig

log = logging.getLogger("service")
router = APIRouter(tags=["score"])

_JSON = "application/json"
_DOCUMENTED = {
    200: {"description": "scores in item order", "content": {_JSON: {"schema": {"$ref": "#/components/schemas/ScoreResponse"}}}},
    404: {"description": "unknown variant, or no model loaded for it"},
    408: {"description": "the body did not arrive in time (the connection is closed)"},
    413: {"description": "body larger than the limit"},
    415: {"description": "the body is not application/json, or has a Content-Encoding"},
    422: {"description": "invalid request; `detail[].loc` is the field path"},
    500: {"description": "unexpected error; the body carries the request id"},
    503: {"description": "overloaded or the feature store is down; retry after Retry-After seconds"},
}


@router.post(
    "/score",
    responses=_DOCUMENTED,  # type: ignore[arg-type]
    openapi_extra={"requestBody": {"required": True, "content": {_JSON: {"schema": {"$ref": "#/components/schemas/ScoreRequest"}}}}},
)
async def score(request: Request) -> Response:
    """Score candidate items for one user; scores come back in item order."""
    svc: Service = request.app.state.service
    ctx = request.scope["ctr"]
    ticket = ctx.ticket  # admitted at the door (service/admission.py), before the body was read
    body = await read_body(request, svc.cfg.limits)
    req = parse(svc, body, ticket)
    request_id = ctx.adopt(req.request_id)
    ctx.variant = variant = svc.assigner.assign(req.user_id, req.variant)
    item_ids = [it.item_id for it in req.items]
    fetched = await fetch(svc, req.user_id, item_ids)
    model = svc.registry.get(variant)
    tokens = encode(svc, model, req, fetched, item_ids)
    probs = await batch(svc, model, variant, tokens, ticket)
    ticket.done = True
    if svc.cfg.shadow is not None:
        svc.spawn(shadow(svc, req, fetched, item_ids, request_id))
    return respond(svc, model, variant, probs, fetched, req.request_id or request_id)


# ---------------------------------------------------------------- stages
async def read_body(request: Request, limits: "LimitsConfig") -> bytes:
    """The whole body within `body_timeout_s` and `max_body_bytes` (408, 413, client gone)."""
    receive = request.receive
    limit = limits.max_body_bytes
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(limits.body_timeout_s):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise ClientGone()
                chunk = message.get("body", b"")
                if chunk:
                    size += len(chunk)
                    if size > limit:
                        raise PayloadTooLarge(limit)
                    chunks.append(chunk)
                if not message.get("more_body", False):
                    break
    except TimeoutError:
        raise BodyTimeout(limits.body_timeout_s) from None
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def parse(svc: "Service", body: bytes, ticket: "Ticket") -> ScoreRequest:
    """The typed request (422 on any bad field); its real row count replaces the estimate."""
    req = parse_request(body, svc.cfg.limits.max_items)
    n = len(req.items)
    ticket.set_rows(n)
    svc.admission.learn_body(len(body), n)
    svc.metrics.request_items.observe(n)
    return req


async def fetch(svc: "Service", user_id: Any, item_ids: list[Any]) -> Fetched:
    """Stored rows for the user and items; a store failure degrades, or is a 503 if so configured."""
    m = svc.metrics
    t0 = time.perf_counter()
    fetched = await svc.store.fetch(user_id, item_ids)
    m.feature_fetch_seconds.labels(svc.store.kind).observe(time.perf_counter() - t0)
    if fetched.cache_hits:
        m.cache_hits.inc(fetched.cache_hits)
    if fetched.cache_misses:
        m.cache_misses.inc(fetched.cache_misses)
    if fetched.degraded:
        m.degraded.labels(fetched.reason or "store_error").inc()
        if fetched.store_failed and svc.cfg.features.on_store_error == "reject":
            raise Overloaded("store_unavailable", "feature store unavailable")
    return fetched


def encode(svc: "Service", model: LoadedModel, req: ScoreRequest, fetched: Fetched, item_ids: list[Any]) -> np.ndarray:
    """Tokens [items, fields] by the model's own spec; values it refuses are a 422 (SpecError)."""
    missing = Missing()
    feats = [it.features for it in req.items]
    tokens = model.encoder.encode_request(req.user_id, fetched.user, fetched.items, item_ids, feats, req.context, missing)
    for entity, n in missing.counts.items():
        svc.metrics.feature_missing.labels(entity).inc(n)
    return tokens


async def batch(svc: "Service", model: LoadedModel, variant: str, tokens: np.ndarray, ticket: "Ticket") -> np.ndarray:
    """Probabilities from the model's batcher (503 when its queue is full or the deadline passes;
    a deadline tells admission control it let in too much)."""
    n = tokens.shape[0]
    inflight = svc.metrics.inflight_rows.labels(variant)
    inflight.inc(n)
    try:
        # Through the batcher; a variant with test-time paths adds its path rows (service/test_time.py).
        return await score_tokens(model, tokens, time.monotonic() + svc.cfg.batcher.timeout_ms / 1000.0)
    except QueueOverloaded as exc:
        ticket.expired = exc.reason == "deadline"
        raise
    finally:
        inflight.dec(n)


def respond(svc: "Service", model: LoadedModel, variant: str, probs: np.ndarray, fetched: Fetched, request_id: str) -> Response:
    svc.metrics.prediction.labels(variant).observe(float(probs.mean()))
    out = {
        "request_id": request_id,
        "model": model.name,
        "version": model.version,
        "variant": variant,
        # float32 straight from the array, in its shortest round-trip form: no Python list of
        # floats, half the bytes of their float64 expansions, and the exact scores computed.
        "scores": np.ascontiguousarray(probs, dtype=np.float32),
        "degraded": fetched.degraded,
    }
    return Response(orjson.dumps(out, option=orjson.OPT_SERIALIZE_NUMPY), media_type=_JSON)


async def shadow(svc: "Service", req: ScoreRequest, fetched: Fetched, item_ids: list[Any], request_id: str) -> None:
    """Score the shadow variant off the response path; its scores only reach metrics and logs."""
    assert svc.cfg.shadow is not None
    name = svc.cfg.shadow.name
    try:
        model = svc.registry.get(name)
        feats = [it.features for it in req.items]
        tokens = model.encoder.encode_request(req.user_id, fetched.user, fetched.items, item_ids, feats, req.context)
        probs = await score_tokens(model, tokens, time.monotonic() + svc.cfg.batcher.timeout_ms / 1000)
    except QueueOverloaded as exc:
        svc.metrics.rejected.labels(name, exc.reason).inc()
        return
    except Exception as exc:  # a shadow failure must never reach the caller
        log.warning("shadow_failed %s", kv(request_id=request_id, variant=name, error=str(exc)[:200]))
        return
    svc.metrics.prediction.labels(name).observe(float(probs.mean()))
    log.debug("shadow %s", kv(request_id=request_id, variant=name, mean=float(probs.mean())))
