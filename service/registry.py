"""Which model version serves each A/B variant, and swapping it without failing a request.

A variant points at a `LoadedModel`: package + encoder + warmed onnxruntime session + its own
batcher. Tokens are only meaningful for the spec they were encoded with, so each version has
its own batcher: a reload loads, verifies and warms the new version beside the old one,
then replaces the pointer in one assignment. Requests that already encoded with the old spec
finish on the old session (its batcher drains in the background); new requests go to the new
one. A load that fails leaves the pointer alone and is counted.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

from model.logs import kv
from service.batcher import Batcher
from service.config import ServiceConfig, VariantConfig
from service.encoding import FastEncoder, RequestEncoder
from service.metrics import Metrics
from service.package import Package, PackageRefused, latest_version, load_package
from service.scorer import Scorer

log = logging.getLogger(__name__)


class UnknownModel(LookupError):
    pass


@dataclass
class LoadedModel:
    variant: str
    package: Package
    encoder: RequestEncoder
    scorer: Scorer
    batcher: Batcher
    fast: FastEncoder = field(init=False)

    def __post_init__(self) -> None:
        self.fast = FastEncoder(self.encoder)

    @property
    def name(self) -> str:
        return self.package.name

    @property
    def version(self) -> int:
        return self.package.version


@dataclass
class Registry:
    cfg: ServiceConfig
    metrics: Metrics
    executor: Executor
    models: dict[str, LoadedModel] = field(default_factory=dict)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _failed: set[tuple[str, int]] = field(default_factory=set)
    _retiring: set[asyncio.Task] = field(default_factory=set)
    on_swap: Callable[[], None] | None = None  # runs after a new version is swapped in

    def variant_configs(self) -> list[VariantConfig]:
        out = list(self.cfg.variants)
        if self.cfg.shadow is not None:
            out.append(self.cfg.shadow)
        return out

    def get(self, variant: str) -> LoadedModel:
        try:
            return self.models[variant]
        except KeyError:
            raise UnknownModel(variant) from None

    def _resolve(self, vc: VariantConfig) -> int:
        if vc.version != "latest":
            return int(vc.version)
        v = latest_version(self.cfg.repo, vc.model)
        if v is None:
            raise FileNotFoundError(f"no versions of model '{vc.model}' in {self.cfg.repo}")
        return v

    def _build(self, vc: VariantConfig, version: int) -> LoadedModel:
        """Blocking: verify, open the session and warm every bucket (runs in a thread)."""
        pkg = load_package(self.cfg.repo, vc.model, version)
        sc = self.cfg.scorer
        buckets = sorted(set(sc.buckets) | {self.cfg.batcher.max_batch_rows})
        try:
            scorer = Scorer(pkg.onnx_path, sc.providers, sc.intra_op_threads, sc.inter_op_threads, buckets, pkg.input_name, pkg.output_name)
            if scorer.num_fields is not None and scorer.num_fields != pkg.spec.num_fields:
                raise PackageRefused(f"model takes {scorer.num_fields} fields, spec has {pkg.spec.num_fields}")
            scorer.warmup(pkg.spec.num_fields, sc.warmup_runs)
        except PackageRefused:
            raise
        except Exception as exc:  # onnxruntime refuses a damaged graph with many exception types
            raise PackageRefused(f"{vc.model}/{version}: {exc}") from exc
        b = self.cfg.batcher
        m = self.metrics
        name = vc.name
        batcher = Batcher(
            scorer.score,
            self.executor,
            max_batch_rows=b.max_batch_rows,
            max_queue_delay_ms=b.max_queue_delay_ms,
            max_queue_rows=b.max_queue_rows,
            workers=b.worker_threads,
            enabled=b.enabled,
            on_batch=lambda rows, s: (m.batch_rows.labels(name).observe(rows), m.inference_seconds.labels(name).observe(s)),
            on_dispatch=lambda s: m.queue_seconds.labels(name).observe(s),
        )
        return LoadedModel(name, pkg, RequestEncoder.for_spec(pkg.spec), scorer, batcher)

    async def load(self, vc: VariantConfig, version: int | None = None, *, initial: bool = False) -> dict[str, Any]:
        """Load one version of one variant beside the current one and swap it in."""
        async with self._lock:
            old = self.models.get(vc.name)
            try:
                version = version if version is not None else self._resolve(vc)
                if old is not None and old.version == version and old.name == vc.model:
                    return {"variant": vc.name, "model": vc.model, "version": version, "result": "unchanged"}
                new = await asyncio.to_thread(self._build, vc, version)
            except Exception as exc:
                self.metrics.reload.labels(vc.name, "failed").inc()
                if version is not None:
                    self._failed.add((vc.model, int(version)))
                log.error("model_load_failed %s", kv(variant=vc.name, model=vc.model, version=version, error=str(exc)[:300]))
                if initial:
                    raise
                return {"variant": vc.name, "model": vc.model, "version": version, "result": "failed", "error": str(exc)[:300]}
            new.batcher.start()
            self.models[vc.name] = new  # the atomic swap: one dict assignment on the event loop
            self.metrics.reload.labels(vc.name, "ok").inc()
            self.metrics.model_info.labels(new.name, str(new.version), vc.name, new.scorer.provider).set(1)
            if old is not None:
                try:
                    self.metrics.model_info.remove(old.name, str(old.version), vc.name, old.scorer.provider)
                except KeyError:
                    pass
                task = asyncio.get_running_loop().create_task(old.batcher.drain())
                self._retiring.add(task)
                task.add_done_callback(self._retiring.discard)
            if self.on_swap is not None and not initial:
                self.on_swap()
            log.info("model_loaded %s", kv(variant=vc.name, model=new.name, version=new.version, provider=new.scorer.provider))
            return {"variant": vc.name, "model": new.name, "version": new.version, "result": "ok", "provider": new.scorer.provider}

    async def load_all(self) -> None:
        for vc in self.variant_configs():
            await self.load(vc, initial=True)

    async def reload(self, variant: str | None = None, version: int | None = None, *, explicit: bool = True) -> list[dict[str, Any]]:
        """Bring variants to their configured version (newest for "latest").

        Polling skips a version that already failed, so a broken package is counted once, not
        once per poll; an explicit admin reload tries it again.
        """
        targets = [vc for vc in self.variant_configs() if variant is None or vc.name == variant]
        if variant is not None and not targets:
            raise UnknownModel(variant)
        results = []
        for vc in targets:
            want = version
            if want is None:
                try:
                    want = self._resolve(vc)
                except FileNotFoundError as exc:
                    results.append({"variant": vc.name, "result": "failed", "error": str(exc)})
                    continue
            if not explicit and (vc.model, want) in self._failed:
                continue
            results.append(await self.load(vc, want))
        return results

    async def poll(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.reload(explicit=False)
            except Exception as exc:  # polling must never die
                log.error("reload_poll_error %s", kv(error=str(exc)[:300]))

    async def drain(self, timeout_s: float = 30.0) -> None:
        await asyncio.gather(*(m.batcher.drain(timeout_s) for m in self.models.values()), *self._retiring)

    def describe(self) -> list[dict[str, Any]]:
        return [
            {"variant": v, "model": m.name, "version": m.version, "provider": m.scorer.provider, "fields": m.package.spec.num_fields}
            for v, m in self.models.items()
        ]

    def all(self) -> Iterable[LoadedModel]:
        return self.models.values()
