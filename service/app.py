"""The FastAPI application: the service's parts, its lifespan and its routers.

`create_app` builds one `Service` (settings, metrics, feature store, model registry, A/B
assigner, admission control), keeps it on `app.state.service`, and mounts the routers of
service/routes: score, health and admin. Typed errors become answers in service/errors.py;
the request id, the request timing and unexpected exceptions are handled around every route
by service/request_context.py. ARCHITECTURE.md §7 lists the statuses.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI

from model.logs import kv
from service import errors
from service.ab import Assigner
from service.admission import Admission, AdmissionGate
from service.config import ServiceConfig, load_settings, with_default_variant
from service.features import FeatureStore, build_store, feature_data_check
from service.gc_pauses import GcPauseTimer, freeze_heap
from service.health import Check, Lifecycle
from service.metrics import Metrics
from service.registry import Registry
from service.request_context import RequestContextMiddleware
from service.routes import admin, docs, health, score
from service.schemas import openapi_components

log = logging.getLogger("service")


@dataclass
class Service:
    """Everything one running app holds; kept on app.state so routes and tests can reach it."""

    cfg: ServiceConfig
    metrics: Metrics
    store: FeatureStore
    registry: Registry
    assigner: Assigner
    admission: Admission
    executor: ThreadPoolExecutor
    lifecycle: Lifecycle = field(default_factory=Lifecycle)
    # Readiness checks by name, beside "models loaded, warm, not draining" (service/health.py).
    checks: dict[str, Check] = field(default_factory=dict)
    tasks: set = field(default_factory=set)

    def spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


def build_service(cfg: ServiceConfig, store: FeatureStore | None = None) -> Service:
    cfg = with_default_variant(cfg)
    metrics = Metrics()
    executor = ThreadPoolExecutor(max_workers=cfg.batcher.worker_threads, thread_name_prefix="ort")
    limits = cfg.limits
    store = store if store is not None else build_store(cfg.features)
    svc = Service(
        cfg=cfg,
        metrics=metrics,
        store=store,
        registry=Registry(cfg, metrics, executor),
        assigner=Assigner([v.name for v in cfg.variants], [v.weight for v in cfg.variants], cfg.ab_salt),
        admission=Admission(
            max_inflight_requests=limits.max_inflight_requests,
            max_inflight_rows=limits.max_inflight_rows or cfg.batcher.max_queue_rows,
            max_wait_s=(limits.max_wait_ms or cfg.batcher.timeout_ms) / 1000.0,
            max_items=limits.max_items,
        ),
        executor=executor,
    )
    adm_limit, adm_rate = metrics.admission_row_limit, metrics.admission_rate
    adm_limit.set(svc.admission.row_limit)
    svc.admission.on_change = lambda limit, rate: (adm_limit.set(limit), adm_rate.set(rate or 0.0))
    svc.checks["store"] = store.ping
    svc.checks["features"] = feature_data_check(store, metrics)  # the data `ctr features load` wrote is all there
    svc.registry.on_build = lambda model: store.use_fields(model.encoder.plan)  # Redis reads only served fields
    return svc


def _lifespan(svc: Service):
    cfg = svc.cfg
    gc_timer = GcPauseTimer(svc.metrics.gc_pause_seconds)
    if cfg.gc_freeze:
        svc.registry.on_swap = lambda: freeze_heap(collect=False)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        gc_timer.install()
        switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(cfg.gil_switch_interval_ms / 1000.0)
        await svc.registry.load_all()
        if cfg.reload_poll_s > 0:
            svc.spawn(svc.registry.poll(cfg.reload_poll_s))
        if cfg.gc_freeze:
            freeze_heap(collect=True)
        svc.lifecycle.warmed = True
        log.info("ready %s", kv(models=svc.registry.describe(), store=svc.store.kind))
        try:
            yield
        finally:
            svc.lifecycle.begin_drain()
            for t in list(svc.tasks):
                t.cancel()
            await svc.registry.drain()
            await svc.store.close()
            svc.executor.shutdown(wait=True)
            gc_timer.uninstall()
            sys.setswitchinterval(switch_interval)
            if cfg.gc_freeze:
                gc.unfreeze()  # hand the heap back to the collector (several apps share a test process)
            log.info("stopped %s", kv(store=svc.store.kind))

    return lifespan


def create_app(cfg: ServiceConfig, store: FeatureStore | None = None) -> FastAPI:
    svc = build_service(cfg, store)
    app = FastAPI(title="ctr-serve", version="0.1.0", lifespan=_lifespan(svc), docs_url=None, redoc_url=None)
    app.state.service = svc
    app.include_router(score.router)
    app.include_router(health.router)
    app.include_router(admin.router)
    docs.install(app)
    errors.install(app)
    # add_middleware wraps: the last added runs first. Request context outermost, so every
    # answer (a refusal at the gate included) carries the request id and is timed.
    app.add_middleware(AdmissionGate, admission=svc.admission, limits=svc.cfg.limits)
    app.add_middleware(RequestContextMiddleware, metrics=svc.metrics)
    _install_openapi(app)
    return app


def _install_openapi(app: FastAPI) -> None:
    """Publish the request and response schemas in the OpenAPI components: the score route
    reads raw bytes for speed, so FastAPI cannot infer them; msgspec's structs give them."""
    from fastapi.openapi.utils import get_openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        schema.setdefault("components", {}).setdefault("schemas", {}).update(openapi_components())
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def from_env() -> FastAPI:
    """uvicorn factory: `uvicorn --factory service.app:from_env`, the settings `ctr serve` reads (CTR_* env, CTR_CONFIG)."""
    return create_app(load_settings(configure_logging=True))
