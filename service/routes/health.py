"""Health, metrics and model listing: what probes, scrapers and operators read.

`/healthz` and `/readyz` are the Kubernetes probes; `/v2/health/live` and `/v2/health/ready`
answer the same questions in the Open Inference Protocol's words (200 for true, 400 for false,
as the protocol asks), so KServe-style tooling can probe the service unchanged.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from service.errors import json_response
from service.health import readiness

router = APIRouter(tags=["health"])

_METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@router.get("/healthz", responses={200: {"description": "the process answers"}})
async def healthz() -> Response:
    return json_response(200, {"status": "alive"})


@router.get("/readyz", responses={200: {"description": "ready for traffic"}, 503: {"description": "not ready (loading, store down or draining)"}})
async def readyz(request: Request) -> Response:
    ready, body = await readiness(request.app.state.service)
    return json_response(200 if ready else 503, body)


@router.get("/v2/health/live", responses={200: {"description": "live (Open Inference Protocol)"}})
async def oip_live() -> Response:
    return json_response(200, {"live": True})


@router.get("/v2/health/ready", responses={200: {"description": "ready (Open Inference Protocol)"}, 400: {"description": "not ready"}})
async def oip_ready(request: Request) -> Response:
    ready, _ = await readiness(request.app.state.service)
    return json_response(200 if ready else 400, {"ready": ready})


@router.get("/metrics", responses={200: {"description": "Prometheus text format", "content": {_METRICS_TYPE: {}}}})
async def metrics(request: Request) -> Response:
    return Response(request.app.state.service.metrics.render(), media_type=_METRICS_TYPE)


@router.get("/models", responses={200: {"description": "the version serving each variant"}})
async def models(request: Request) -> Response:
    return json_response(200, {"models": request.app.state.service.registry.describe()})
