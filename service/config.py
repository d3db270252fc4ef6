"""Service settings: one typed object, read from a YAML/JSON file, then CLI/env overrides.

Settings are a pydantic model so a typo in a config file fails at start-up with the field
path, not hours later when the code path that reads it first runs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

ADMIN_TOKEN_ENV = "CTR_ADMIN_TOKEN"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class VariantConfig(_Strict):
    """One A/B arm: a model name in the repository, a version (or "latest") and a weight."""

    name: str = "main"
    model: str
    version: int | Literal["latest"] = "latest"
    weight: float = Field(1.0, ge=0)


class BatcherConfig(_Strict):
    """Triton-style dynamic batching, counted in rows (candidates), not requests."""

    enabled: bool = True
    max_batch_rows: int = Field(1024, ge=1)
    max_queue_delay_ms: float = Field(2.0, ge=0)
    max_queue_rows: int = Field(20_000, ge=1)
    # A request that waits longer than this in the queue is answered 503 rather than late.
    timeout_ms: float = Field(1000.0, gt=0)
    # onnxruntime calls run on these threads; one keeps the intra-op pool from oversubscribing.
    worker_threads: int = Field(1, ge=1)


class ScorerConfig(_Strict):
    providers: list[str] = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    intra_op_threads: int = Field(0, ge=0, description="0 = number of CPU cores")
    inter_op_threads: int = Field(1, ge=1)
    # Batches are padded up to one of these sizes so each shape is warmed before ready.
    # Roughly 1.5x steps: a batch pays for its bucket's rows, so coarse steps (128 -> 512) made a
    # typical 165-row batch cost 3x its rows and added ~2 ms to p50 at light load.
    buckets: list[int] = [1, 2, 4, 8, 16, 32, 64, 96, 128, 192, 256, 384, 512, 768, 1024]
    warmup_runs: int = Field(2, ge=1)

    @field_validator("buckets")
    @classmethod
    def _sorted(cls, v: list[int]) -> list[int]:
        if not v or any(b < 1 for b in v):
            raise ValueError("buckets must be positive sizes")
        return sorted(set(v))


class FeaturesConfig(_Strict):
    redis_url: str | None = None
    prefix: str = "ctr"
    ttl_s: int = Field(7 * 24 * 3600, ge=0)
    # What to do when Redis does not answer: serve default features (degraded) or refuse.
    on_store_error: Literal["degrade", "reject"] = "degrade"
    timeout_s: float = Field(0.05, gt=0)
    # Embedded store tables (parquet/csv) used when redis_url is not set.
    users_table: str | None = None
    items_table: str | None = None
    cache_items: int = Field(10_000, ge=0)
    cache_ttl_s: float = Field(30.0, ge=0)


class LimitsConfig(_Strict):
    max_items: int = Field(1000, ge=1)
    max_body_bytes: int = Field(1_000_000, ge=1024)


class ServiceConfig(_Strict):
    repo: str = "models"
    variants: list[VariantConfig] = []
    shadow: VariantConfig | None = None
    ab_salt: str = "ctr-ab-v1"
    batcher: BatcherConfig = BatcherConfig()
    scorer: ScorerConfig = ScorerConfig()
    features: FeaturesConfig = FeaturesConfig()
    limits: LimitsConfig = LimitsConfig()
    reload_poll_s: float = Field(0.0, ge=0, description="0 disables polling")
    drain_grace_s: float = Field(0.0, ge=0, description="readiness is false this long before the listener closes")
    admin_token_env: str = ADMIN_TOKEN_ENV
    # Freeze the warmed heap out of CPython's full collections (see service/gc_pauses.py);
    # off only to measure what it buys.
    gc_freeze: bool = True
    # How long a busy event loop may hold the GIL before the onnxruntime thread gets it back
    # to return a finished batch (CPython's sys.setswitchinterval). CPython's 5 ms left
    # onnxruntime idle between batches at saturation; 0.5 ms gave ~15% more rows/s with the
    # same p99 at equal load (docs/benchmarks.md). It only matters when a thread is waiting.
    gil_switch_interval_ms: float = Field(0.5, gt=0)

    @property
    def admin_token(self) -> str | None:
        return os.environ.get(self.admin_token_env) or None


def with_default_variant(cfg: ServiceConfig) -> ServiceConfig:
    """No variants configured: serve the repository's only model, newest version, as "main"."""
    if cfg.variants:
        return cfg
    base = Path(cfg.repo)
    names = sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")) if base.is_dir() else []
    if len(names) != 1:
        raise ValueError(f"repository {cfg.repo} holds {len(names)} models {names}: name the one to serve (--model or variants)")
    return cfg.model_copy(update={"variants": [VariantConfig(name="main", model=names[0])]})


def load_config(path: str | Path | None = None, **overrides: Any) -> ServiceConfig:
    """Read a YAML or JSON file (or nothing), then apply non-None keyword overrides."""
    data: dict[str, Any] = {}
    if path:
        p = Path(path)
        text = p.read_text(encoding="utf-8")
        if p.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    for key, value in overrides.items():
        if value is None:
            continue
        section, _, leaf = key.partition("__")
        if leaf:
            data.setdefault(section, {})[leaf] = value
        else:
            data[key] = value
    return ServiceConfig.model_validate(data)
