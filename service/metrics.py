"""Prometheus metrics with the names fixed in docs/design.md.

Each app owns its CollectorRegistry, so several apps in one process (tests, benchmarks) do
not collide, and /metrics shows exactly one service's numbers. Dashboards and alert rules are
built against these names and labels: change them only together with deploy/.

`ctr serve --workers N` runs N processes behind one port, and a scrape reaches one of them.
There prometheus_client's multiprocess mode is on (PROMETHEUS_MULTIPROC_DIR, set by the
parent before any worker imports prometheus_client): every process writes its values to
files in that directory and /metrics merges them, so any worker answers for all. Counters
and histograms are summed, dead workers included, so they never go backwards. Gauges say
how to merge: rows in flight add up over live workers; a model version is served (1) while
any live worker serves it, so the labels stay those of the one-process service.
"""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# Latency buckets from 0.5 ms to 2.5 s: the service's interesting range is 1–50 ms.
_LAT = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)
# An answer can take far longer than its work (a slow body, a deep queue): up to 30 s.
_REQ = (*_LAT, 5.0, 10.0, 30.0)
_ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
_PROB = (0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def multiprocess_dir() -> str | None:
    return os.environ.get(MULTIPROC_ENV) or None


class _InfoGauge(Gauge):
    """An info-style gauge (1 = this label set is current). Multiprocess mode cannot drop a
    label set from the other processes' files, so a retired one is set to 0 first: merged
    with `livemax`, it reads 0 once no live worker still serves it."""

    def remove(self, *labelvalues: Any) -> None:
        self.labels(*labelvalues).set(0)
        if multiprocess_dir() is None:
            super().remove(*labelvalues)


class Metrics:
    def __init__(self) -> None:
        self.multiproc_dir = multiprocess_dir()
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.request_seconds = Histogram(
            "ctr_request_seconds", "POST /score latency by variant and HTTP status", ["variant", "status"], buckets=_REQ, registry=r
        )
        self.request_items = Histogram("ctr_request_items", "items per parsed POST /score body", buckets=_ROWS, registry=r)
        self.client_disconnects = Counter(
            "ctr_client_disconnects_total", "POST /score clients that left before their body arrived", registry=r
        )
        self.queue_seconds = Histogram("ctr_queue_seconds", "time rows wait in the batcher queue", ["variant"], buckets=_LAT, registry=r)
        self.batch_rows = Histogram("ctr_batch_rows", "rows per onnxruntime call (before bucket padding)", ["variant"], buckets=_ROWS, registry=r)
        self.inference_seconds = Histogram("ctr_inference_seconds", "onnxruntime run time per batch", ["variant"], buckets=_LAT, registry=r)
        self.feature_fetch_seconds = Histogram(
            "ctr_feature_fetch_seconds", "feature store round trip per request", ["store"], buckets=_LAT, registry=r
        )
        self.feature_missing = Counter(
            "ctr_feature_missing_total", "entities or fields served with the OOV/default token", ["entity"], registry=r
        )
        # The feature manifest check (service/manifest.py), updated whenever readiness runs it.
        self.feature_manifest_ok = Gauge(
            "ctr_feature_manifest_ok", "1 while the feature data the manifest names is all there", registry=r, multiprocess_mode="livemin"
        )
        self.feature_rows = Gauge(
            "ctr_feature_rows", "rows the feature manifest names, by entity", ["entity"], registry=r, multiprocess_mode="livemax"
        )
        self.cache_hits = Counter("ctr_cache_hits_total", "item rows served from the in-process cache", registry=r)
        self.cache_misses = Counter("ctr_cache_misses_total", "item rows fetched from the store", registry=r)
        self.inflight_rows = Gauge(
            "ctr_inflight_rows", "rows accepted and not yet answered", ["variant"], registry=r, multiprocess_mode="livesum"
        )
        self.rejected = Counter("ctr_rejected_total", "requests refused with 503", ["variant", "reason"], registry=r)
        self.degraded = Counter("ctr_degraded_total", "requests served with default features", ["reason"], registry=r)
        self.reload = Counter("ctr_reload_total", "model version loads", ["variant", "result"], registry=r)
        self.load_failures = Counter("ctr_model_load_failures_total", "model versions refused at start-up or reload, by reason",
                                     ["variant", "reason"], registry=r)
        self.prediction = Histogram("ctr_prediction", "predicted probabilities", ["variant"], buckets=_PROB, registry=r)
        self.gc_pause_seconds = Histogram(
            "ctr_gc_pause_seconds", "CPython garbage-collection pauses by generation (they stall every request in flight)",
            ["generation"], buckets=_LAT, registry=r,
        )
        # Test-time paths (service/test_time.py): rows scored by a variant with test_time set,
        # those that took extra paths, and the extra model rows they cost. Share of rows with
        # paths = rows_with_paths / rows; model work per row = 1 + extra_rows / rows.
        self.test_time_rows = Counter(
            "ctr_test_time_rows_total", "rows scored by a variant with test-time paths", ["variant", "method"], registry=r
        )
        self.test_time_rows_with_paths = Counter(
            "ctr_test_time_rows_with_paths_total", "rows that took extra test-time paths", ["variant", "method"], registry=r
        )
        self.test_time_extra_rows = Counter(
            "ctr_test_time_extra_rows_total", "extra model rows scored for test-time paths", ["variant", "method"], registry=r
        )
        # Model passes per row a test-time method costs, whether as extra batch rows (MATT: the
        # plain row plus its paths) or inside one graph (SGCTR: R * groups + 1 denoiser runs for
        # score=sweep, R + 1 for rotate). Extra model work per row = model_passes / rows - 1.
        self.test_time_model_passes = Counter(
            "ctr_test_time_model_passes_total", "model (denoiser) passes run for rows of a variant with test-time paths",
            ["variant", "method"], registry=r
        )
        # Admission control's adaptive state (service/admission.py), summed over workers: the row
        # limit shrinks each time an admitted request still times out in the queue, so a limit far
        # below max_inflight_rows while 503s rise says admission, not the queue bound, is shedding.
        self.admission_row_limit = Gauge(
            "ctr_admission_row_limit", "rows admission control lets in flight (adaptive)", registry=r, multiprocess_mode="livesum"
        )
        self.admission_rate = Gauge(
            "ctr_admission_completion_rate_rows", "rows per second completed while at capacity, as admission measures it",
            registry=r, multiprocess_mode="livesum",
        )
        self.model_info = _InfoGauge(
            "ctr_model_info", "the model version serving each variant", ["name", "version", "variant", "provider"], registry=r,
            multiprocess_mode="livemax",
        )

    def render(self) -> bytes:
        if self.multiproc_dir is None:
            return generate_latest(self.registry)
        from prometheus_client.multiprocess import MultiProcessCollector

        merged = CollectorRegistry()
        MultiProcessCollector(merged, path=self.multiproc_dir)
        return generate_latest(merged)
