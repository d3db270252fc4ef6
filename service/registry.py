"""Which model version serves each A/B variant, and swapping it without failing a request.

A variant points at a `LoadedModel`: package + encoder + warmed onnxruntime session + its own
batcher. Tokens are only meaningful for the spec they were encoded with, so each version has
its own batcher: a reload loads, verifies and warms the new version beside the old one,
then replaces the pointer in one assignment. Requests that already encoded with the old spec
finish on the old session (its batcher drains in the background); new requests go to the new
one. A load that fails leaves the pointer alone and is counted.

At a fresh start there is no pointer to keep, so a version that cannot be served (corrupt,
incomplete, or built for another spec) is skipped, counted under
`ctr_model_load_failures_total{variant,reason}` and named in a WARNING, and the newest good
version serves: a restart or a scale-up must not crash-loop on one bad publish. The choice is
made when the registry is built, before the server starts, because a failure there is one
line and a non-zero exit, while the same failure inside the ASGI lifespan is a server
traceback.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from model.logs import kv
from service.batcher import Batcher
from service.config import ServiceConfig, VariantConfig
from service.encoding import RequestEncoder
from service.metrics import Metrics
from service.package import Package, PackageRefused, latest_version, list_versions, load_package
from service.providers import choose_providers
from service.scorer import Scorer
from service.test_time import SgctrPath, TestTimePath, TestTimeRefused, build_test_time

log = logging.getLogger(__name__)


class UnknownModel(LookupError):
    pass


class NoServableModel(SystemExit):
    """No version of a variant can be served, so the process must not start.

    A SystemExit whose code is the message: uncaught, Python prints only that line and exits
    with status 1, wherever the app is built (`ctr serve`, `uvicorn --factory`), instead of a
    traceback that buries the reason.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


# Failure reasons for ctr_model_load_failures_total, from the verifier's and onnxruntime's
# words, first match wins (a spec's sha256 mismatch is an incompatible spec, not a corrupt file).
_REASONS = (
    ("missing_file", ("missing ", "not a package folder", "no model package", "no such file")),
    ("incompatible", ("feature_spec", "spec has", "fields")),
    ("checksum", ("sha256 mismatch", "bytes but metadata.json says", "onnx_sha256")),
    ("onnx_load", ("model.onnx does not load", "onnx.checker", "onnxruntime", "protobuf", "load model")),
    ("incompatible", ("input", "output", "opset", "metadata.json")),
)


def failure_reason(exc: BaseException) -> str:
    """A small fixed label set, so the metric's cardinality stays bounded."""
    if isinstance(exc, TestTimeRefused) or isinstance(exc.__cause__, TestTimeRefused):
        return "test_time"  # the variant's test-time setting, not the package (plain still serves it)
    if isinstance(exc, FileNotFoundError):
        return "missing_file"
    text = str(exc).lower()
    for reason, needles in _REASONS:
        if any(n in text for n in needles):
            return reason
    return "invalid"


@dataclass
class LoadedModel:
    variant: str
    package: Package
    encoder: RequestEncoder  # this version's own (its item token cache dies with it)
    scorer: Scorer
    batcher: Batcher
    # This variant's MATT paths or SGCTR refinement graph (service/test_time.py); with SGCTR
    # the batcher runs test_time.runner, not `scorer` (which stays the version's plain session).
    test_time: TestTimePath | SgctrPath | None = None

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
    # (variant, model, version): a version one variant refused (a MATT variant on a package
    # without statistics) can still serve another variant.
    _failed: set[tuple[str, str, int]] = field(default_factory=set)
    _retiring: set[asyncio.Task] = field(default_factory=set)
    on_swap: Callable[[], None] | None = None  # runs after a new version is swapped in
    on_build: Callable[[LoadedModel], None] | None = None  # runs on a new version before it is swapped in
    # Versions chosen at construction, and their opened packages and sessions, which the first
    # load reuses instead of opening them twice.
    _chosen: dict[str, int] = field(default_factory=dict)
    _opened: dict[tuple[str, str, int], tuple[Package, Scorer, TestTimePath | SgctrPath | None]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.load_failures = self.metrics.load_failures
        for vc in self.variant_configs():
            self._choose(vc)

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

    def _candidates(self, vc: VariantConfig) -> list[int]:
        """Versions to try at start, best first: the pinned one only, or all, newest first."""
        if vc.version != "latest":
            return [int(vc.version)]
        return sorted(list_versions(self.cfg.repo, vc.model), reverse=True)

    def _shared(self, model: str, version: int) -> tuple[Package, Scorer] | None:
        """The package and session another variant already opened for this version.

        Two variants of one version (plain and MATT, an A/B test of MATT) share one
        onnxruntime session: InferenceSession.run is thread-safe, and each variant keeps its
        own batcher, queue and metrics. A hot reload of one variant opens the new version
        (or shares it with a variant already on it); the old session lives while any variant
        still holds it.
        """
        for m in self.models.values():
            if m.name == model and m.version == version:
                return m.package, m.scorer
        for (_, name, v), (pkg, scorer, _) in self._opened.items():
            if name == model and v == version:
                return pkg, scorer
        return None

    def _open(self, vc: VariantConfig, version: int) -> tuple[Package, Scorer, TestTimePath | SgctrPath | None]:
        """Blocking: verify the package, open (or share) its onnxruntime session (no warm-up)
        and build the variant's test-time paths."""
        shared = self._shared(vc.model, version)
        if shared is not None:
            pkg, scorer = shared
            return pkg, scorer, self._test_time(vc, pkg)
        pkg = load_package(self.cfg.repo, vc.model, version)
        try:
            scorer = self._session(pkg.onnx_path, pkg)
            if scorer.num_fields is not None and scorer.num_fields != pkg.spec.num_fields:
                raise PackageRefused(f"model takes {scorer.num_fields} fields, spec has {pkg.spec.num_fields}")
        except PackageRefused:
            raise
        except Exception as exc:  # onnxruntime refuses a damaged graph with many exception types
            raise PackageRefused(f"{vc.model}/{version}: {exc}") from exc
        return pkg, scorer, self._test_time(vc, pkg)

    def _session(self, path: str | Path, pkg: Package) -> Scorer:
        """An onnxruntime session on one of the package's graphs (model.onnx, or an SGCTR
        refinement graph), with the service's threads, providers and buckets."""
        sc = self.cfg.scorer
        buckets = sorted(set(sc.buckets) | {self.cfg.batcher.max_batch_rows})
        # Only providers that can load here: no CUDA error on a CPU host (service/providers.py).
        return Scorer(path, choose_providers(sc.providers), sc.intra_op_threads, sc.inter_op_threads, buckets, pkg.input_name, pkg.output_name,
                      pad=sc.pad_to_buckets)

    def _test_time(self, vc: VariantConfig, pkg: Package) -> TestTimePath | SgctrPath | None:
        try:
            return build_test_time(vc.test_time, pkg.path, pkg.metadata, pkg.spec, open_graph=lambda path: self._session(path, pkg))
        except TestTimeRefused as exc:
            raise PackageRefused(f"{vc.model}/{pkg.version}: {exc}") from exc

    def _count_failure(self, vc: VariantConfig, version: int | None, exc: BaseException) -> str:
        reason = failure_reason(exc)
        self.load_failures.labels(vc.name, reason).inc()
        if version is not None:
            self._failed.add((vc.name, vc.model, int(version)))
        return reason

    def _choose(self, vc: VariantConfig) -> None:
        """Pick the newest version of `vc` that opens, skipping (and counting) the bad ones."""
        candidates = self._candidates(vc)
        skipped: list[str] = []
        for version in candidates:
            try:
                self._opened[(vc.name, vc.model, version)] = self._open(vc, version)
            except Exception as exc:
                reason = self._count_failure(vc, version, exc)
                skipped.append(f"{version} ({reason})")
                log.warning("model_version_skipped %s", kv(variant=vc.name, model=vc.model, version=version, reason=reason, error=str(exc)[:300]))
                continue
            self._chosen[vc.name] = version
            return
        where = f"model '{vc.model}' in {self.cfg.repo}"
        if not candidates:
            raise NoServableModel(f"no versions of {where}")
        if vc.version != "latest":
            raise NoServableModel(f"variant '{vc.name}': pinned version {vc.version} of {where} cannot be served: {skipped[0]} (see the warning above)")
        raise NoServableModel(f"variant '{vc.name}': no servable version of {where}; skipped {', '.join(skipped)} (see the warnings above)")

    def _build(self, vc: VariantConfig, version: int) -> LoadedModel:
        """Blocking: verify, open the session and warm every bucket (runs in a thread)."""
        opened = self._opened.pop((vc.name, vc.model, version), None)
        pkg, scorer, test_time = opened if opened is not None else self._open(vc, version)
        # An SGCTR variant's batches run its refinement graph; every other variant's, model.onnx.
        runner = test_time.runner if test_time is not None and test_time.runner is not None else scorer
        try:
            scorer.warmup(pkg.spec.num_fields, self.cfg.scorer.warmup_runs)
            if runner is not scorer:
                runner.warmup(pkg.spec.num_fields, self.cfg.scorer.warmup_runs)
        except Exception as exc:
            raise PackageRefused(f"{vc.model}/{version}: {exc}") from exc
        b = self.cfg.batcher
        m = self.metrics
        name = vc.name
        batcher = Batcher(
            runner.score,
            self.executor,
            max_batch_rows=b.max_batch_rows,
            max_queue_delay_ms=b.max_queue_delay_ms,
            max_queue_rows=b.max_queue_rows,
            workers=b.worker_threads,
            enabled=b.enabled,
            on_batch=lambda rows, s: (m.batch_rows.labels(name).observe(rows), m.inference_seconds.labels(name).observe(s)),
            on_dispatch=lambda s: m.queue_seconds.labels(name).observe(s),
        )
        if test_time is not None:
            test_time.bind(m, name)
        return LoadedModel(name, pkg, RequestEncoder.for_spec(pkg.spec), scorer, batcher, test_time)

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
                self._count_failure(vc, version, exc)
                log.error("model_load_failed %s", kv(variant=vc.name, model=vc.model, version=version, error=str(exc)[:300]))
                if initial:
                    raise
                return {"variant": vc.name, "model": vc.model, "version": version, "result": "failed", "error": str(exc)[:300]}
            if self.on_build is not None:
                self.on_build(new)
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
        """Start every variant on the version chosen at construction; should that version
        fail now (the repository changed in between), fall back to the next older one."""
        for vc in self.variant_configs():
            chosen = self._chosen.get(vc.name)
            versions = [v for v in self._candidates(vc) if chosen is None or v <= chosen]
            for i, version in enumerate(versions):
                try:
                    await self.load(vc, version, initial=True)
                    break
                except Exception:
                    if i == len(versions) - 1:
                        raise NoServableModel(f"variant '{vc.name}': no servable version of model '{vc.model}' in {self.cfg.repo}") from None
            else:
                raise NoServableModel(f"no versions of model '{vc.model}' in {self.cfg.repo}")
        self._opened.clear()  # sessions chosen but not used (none in the normal path)

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
            if not explicit and (vc.name, vc.model, want) in self._failed:
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
            {"variant": v, "model": m.name, "version": m.version, "provider": m.scorer.provider, "fields": m.package.spec.num_fields,
             "test_time": m.test_time.describe() if m.test_time is not None else None}
            for v, m in self.models.items()
        ]

    def all(self) -> Iterable[LoadedModel]:
        return self.models.values()
