"""The FastAPI application: POST /score plus health, metrics and admin endpoints.

The request body is parsed by pydantic's Rust JSON parser straight from bytes (one pass, no
intermediate dicts), after a size check on the raw bytes, so an oversized body costs nothing
to refuse. Errors follow ARCHITECTURE.md §7: 422 with the field path, 404 for an unknown
variant, 503 + Retry-After when overloaded, degraded answers when Redis is unreachable.
"""

from __future__ import annotations

import asyncio
import gc
import hmac
import logging
import os
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
from fastapi import FastAPI, Request
from fastapi.responses import ORJSONResponse, Response
from pydantic import ValidationError

from model.logs import kv
from model.spec import SpecError
from service.ab import Assigner, UnknownVariant
from service.batcher import Overloaded
from service.config import ServiceConfig, load_config, with_default_variant
from service.encoding import Missing
from service.features import FeatureStore, Fetched, build_store
from service.gc_pauses import GcPauseTimer, freeze_heap
from service.health import Lifecycle
from service.metrics import Metrics
from service.registry import Registry, UnknownModel
from service.schemas import ScoreRequest, ScoreResponse

log = logging.getLogger("service")
RETRY_AFTER_S = "1"


@dataclass
class Service:
    """Everything one running app holds; kept on app.state so tests can reach it."""

    cfg: ServiceConfig
    metrics: Metrics
    store: FeatureStore
    registry: Registry
    assigner: Assigner
    executor: ThreadPoolExecutor
    lifecycle: Lifecycle = field(default_factory=Lifecycle)
    tasks: set = field(default_factory=set)

    def spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


def _json(status: int, body: Any, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json", headers=headers)


def _validation_detail(exc: ValidationError) -> list[dict[str, Any]]:
    return [{"loc": ["body", *e["loc"]], "msg": e["msg"], "type": e["type"]} for e in exc.errors(include_url=False, include_context=False, include_input=False)]


def create_app(cfg: ServiceConfig, store: FeatureStore | None = None) -> FastAPI:
    cfg = with_default_variant(cfg)
    metrics = Metrics()
    executor = ThreadPoolExecutor(max_workers=cfg.batcher.worker_threads, thread_name_prefix="ort")
    svc = Service(
        cfg=cfg,
        metrics=metrics,
        store=store if store is not None else build_store(cfg.features),
        registry=Registry(cfg, metrics, executor),
        assigner=Assigner([v.name for v in cfg.variants], [v.weight for v in cfg.variants], cfg.ab_salt),
        executor=executor,
    )
    store_label = svc.store.kind
    gc_timer = GcPauseTimer(metrics.gc_pause_seconds)
    if cfg.gc_freeze:
        svc.registry.on_swap = lambda: freeze_heap(collect=False)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        gc_timer.install()
        switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(cfg.gil_switch_interval_ms / 1000.0)
        await svc.registry.load_all()
        if cfg.reload_poll_s > 0:
            svc.spawn(svc.registry.poll(cfg.reload_poll_s))
        if cfg.gc_freeze:
            freeze_heap(collect=True)
        svc.lifecycle.warmed = True
        log.info("ready %s", kv(models=svc.registry.describe(), store=store_label))
        try:
            yield
        finally:
            svc.lifecycle.begin_drain()
            for t in list(svc.tasks):
                t.cancel()
            await svc.registry.drain()
            await svc.store.close()
            executor.shutdown(wait=True)
            gc_timer.uninstall()
            sys.setswitchinterval(switch_interval)
            if cfg.gc_freeze:
                gc.unfreeze()  # hand the heap back to the collector (several apps share a test process)
            log.info("stopped %s", kv(store=store_label))

    app = FastAPI(title="ctr-serve", version="0.1.0", lifespan=lifespan, default_response_class=ORJSONResponse)
    app.state.service = svc
    max_body = cfg.limits.max_body_bytes
    max_items = cfg.limits.max_items
    timeout_s = cfg.batcher.timeout_ms / 1000.0
    reject_on_store_error = cfg.features.on_store_error == "reject"
    shadow_name = cfg.shadow.name if cfg.shadow else None

    def finish(variant: str, status: int, t0: float) -> None:
        metrics.request_seconds.labels(variant, str(status)).observe(time.perf_counter() - t0)

    @app.post(
        "/score",
        response_model=ScoreResponse,
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ScoreRequest"}}}}},
        responses={422: {"description": "invalid request (field path in detail)"}, 404: {"description": "unknown variant"}, 503: {"description": "overloaded (Retry-After)"}},
    )
    async def score(request: Request) -> Response:
        """Score candidate items for one user; scores come back in item order."""
        t0 = time.perf_counter()
        body = await request.body()
        if len(body) > max_body:
            finish("none", 413, t0)
            return _json(413, {"detail": [{"loc": ["body"], "msg": f"body exceeds {max_body} bytes", "type": "too_large"}]})
        try:
            req = ScoreRequest.model_validate_json(body)
        except ValidationError as exc:
            finish("none", 422, t0)
            return _json(422, {"detail": _validation_detail(exc)})
        if len(req.items) > max_items:
            finish("none", 422, t0)
            return _json(422, {"detail": [{"loc": ["body", "items"], "msg": f"at most {max_items} items", "type": "too_long"}]})
        try:
            variant = svc.assigner.assign(req.user_id, req.variant)
        except UnknownVariant:
            finish("none", 404, t0)
            return _json(404, {"detail": f"unknown variant '{req.variant}'"})
        item_ids = [it.item_id for it in req.items]
        t1 = time.perf_counter()
        fetched = await svc.store.fetch(req.user_id, item_ids)
        metrics.feature_fetch_seconds.labels(store_label).observe(time.perf_counter() - t1)
        if fetched.cache_hits:
            metrics.cache_hits.inc(fetched.cache_hits)
        if fetched.cache_misses:
            metrics.cache_misses.inc(fetched.cache_misses)
        if fetched.degraded:
            metrics.degraded.labels(fetched.reason or "store_error").inc()
            if reject_on_store_error:
                finish(variant, 503, t0)
                return _json(503, {"detail": "feature store unavailable"}, {"Retry-After": RETRY_AFTER_S})
        # Resolve the model only now, and encode and enqueue with no await in between, so a
        # hot swap can never pair one version's tokens with another version's session.
        try:
            model = svc.registry.get(variant)
        except UnknownModel:
            finish(variant, 404, t0)
            return _json(404, {"detail": f"variant '{variant}' has no model loaded"})
        missing = Missing()
        feats = [it.features for it in req.items]
        try:
            tokens = model.fast.encode_request(req.user_id, fetched.user, fetched.items, item_ids, feats, req.context, missing)
        except SpecError as exc:
            finish(variant, 422, t0)
            return _json(422, {"detail": [{"loc": ["body"], "msg": str(exc), "type": "value_error"}]})
        for entity, n in missing.counts.items():
            metrics.feature_missing.labels(entity).inc(n)
        n = tokens.shape[0]
        inflight = metrics.inflight_rows.labels(variant)
        inflight.inc(n)
        try:
            probs = await model.batcher.submit(tokens, time.monotonic() + timeout_s)
        except Overloaded as exc:
            metrics.rejected.labels(variant, exc.reason).inc()
            finish(variant, 503, t0)
            return _json(503, {"detail": f"overloaded: {exc.reason}"}, {"Retry-After": RETRY_AFTER_S})
        finally:
            inflight.dec(n)
        metrics.prediction.labels(variant).observe(float(probs.mean()))
        if shadow_name is not None:
            svc.spawn(_shadow(svc, req, fetched, item_ids, feats))
        out = {
            "request_id": req.request_id or uuid.uuid4().hex,
            "model": model.name,
            "version": model.version,
            "variant": variant,
            "scores": probs.astype(np.float64).tolist(),
            "degraded": fetched.degraded,
        }
        finish(variant, 200, t0)
        return Response(orjson.dumps(out), media_type="application/json")

    @app.get("/healthz")
    async def healthz() -> Response:
        return _json(200, {"status": "alive"})

    @app.get("/readyz")
    async def readyz() -> Response:
        store_ok = await svc.store.ping()
        ready = svc.lifecycle.warmed and store_ok and not svc.lifecycle.draining and bool(svc.registry.models)
        body = {"ready": ready, "warmed": svc.lifecycle.warmed, "store": store_ok, "draining": svc.lifecycle.draining, "models": svc.registry.describe()}
        return _json(200 if ready else 503, body)

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/models")
    async def models() -> Response:
        return _json(200, {"models": svc.registry.describe()})

    @app.post("/admin/reload")
    async def admin_reload(request: Request) -> Response:
        """Load the newest (or a given) version; needs `Authorization: Bearer $CTR_ADMIN_TOKEN`."""
        token = cfg.admin_token
        given = request.headers.get("authorization", "")
        if not token or not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            return _json(401, {"detail": "missing or invalid bearer token"}, {"WWW-Authenticate": "Bearer"})
        body = await request.body()
        args: dict[str, Any] = {}
        if body.strip():
            try:
                args = orjson.loads(body)
            except orjson.JSONDecodeError:
                return _json(422, {"detail": [{"loc": ["body"], "msg": "invalid JSON", "type": "json_invalid"}]})
            if not isinstance(args, dict) or not set(args) <= {"variant", "version"}:
                return _json(422, {"detail": [{"loc": ["body"], "msg": "expected {variant?, version?}", "type": "value_error"}]})
        try:
            results = await svc.registry.reload(args.get("variant"), args.get("version"))
        except UnknownModel as exc:
            return _json(404, {"detail": f"unknown variant '{exc}'"})
        failed = any(r.get("result") == "failed" for r in results)
        return _json(409 if failed else 200, {"results": results, "models": svc.registry.describe()})

    _install_openapi(app)
    return app


async def _shadow(svc: Service, req: ScoreRequest, fetched: Fetched, item_ids: list[Any], feats: list[Any]) -> None:
    """Score the shadow variant off the response path; its scores only reach metrics and logs."""
    assert svc.cfg.shadow is not None
    name = svc.cfg.shadow.name
    try:
        model = svc.registry.get(name)
        tokens = model.fast.encode_request(req.user_id, fetched.user, fetched.items, item_ids, feats, req.context)
        probs = await model.batcher.submit(tokens, time.monotonic() + svc.cfg.batcher.timeout_ms / 1000)
    except Overloaded as exc:
        svc.metrics.rejected.labels(name, exc.reason).inc()
        return
    except Exception as exc:  # a shadow failure must never reach the caller
        log.warning("shadow_failed %s", kv(variant=name, error=str(exc)[:200]))
        return
    svc.metrics.prediction.labels(name).observe(float(probs.mean()))
    log.debug("shadow %s", kv(request_id=req.request_id, variant=name, mean=float(probs.mean())))


def _install_openapi(app: FastAPI) -> None:
    """Publish ScoreRequest in the OpenAPI components: the route reads raw bytes for speed,
    so FastAPI cannot infer the body schema itself."""
    from fastapi.openapi.utils import get_openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        req = ScoreRequest.model_json_schema(ref_template="#/components/schemas/{model}")
        comps = schema.setdefault("components", {}).setdefault("schemas", {})
        comps.update(req.pop("$defs", {}))
        comps["ScoreRequest"] = req
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def from_env() -> FastAPI:
    """uvicorn factory: `uvicorn --factory service.app:from_env` with CTR_CONFIG / CTR_REPO / CTR_REDIS_URL."""
    cfg = load_config(os.environ.get("CTR_CONFIG"), repo=os.environ.get("CTR_REPO"), features__redis_url=os.environ.get("CTR_REDIS_URL"))
    return create_app(cfg)
