"""Service settings: one typed object (pydantic-settings) from flags, environment and a file.

Precedence, highest first: command-line flags > `CTR_*` environment variables > the YAML or
JSON config file (`--config`, else `CTR_CONFIG`) > the defaults below. Nested keys use `__`
in the environment: `CTR_BATCHER__MAX_BATCH_ROWS=2048` is `batcher: {max_batch_rows: 2048}`;
lists and sections may also be given whole as JSON (`CTR_SCORER__BUCKETS='[1, 64, 512]'`).
`ctr serve` and the uvicorn factory (`service.app:from_env`) both call `load_settings`, so
they read the same environment and file.

Settings are typed models with unknown keys refused, so a typo fails at start-up naming the
key and the valid ones, not hours later when the code path that reads it first runs.
"""

from __future__ import annotations

import contextvars
import os
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    JsonConfigSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from testtime.matt import TestTimeConfig
from testtime.sgctr import SgctrConfig

ADMIN_TOKEN_ENV = "CTR_ADMIN_TOKEN"
ENV_PREFIX = "CTR_"
CONFIG_ENV = "CTR_CONFIG"
# Read by the service but not settings fields; never reported as unknown.
LEGACY_REDIS_ENV = "CTR_REDIS_URL"  # older name of CTR_FEATURES__REDIS_URL (still honoured)

# The config file of the settings being built (set by load_settings for its one call).
_config_file: contextvars.ContextVar[Path | None] = contextvars.ContextVar("ctr_config_file", default=None)


class SettingsError(ValueError):
    """Settings that do not validate; the message names every bad key and the valid ones."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# A variant's `test_time:` block, by its `method`: MATT (also `none`, and the default when no
# method is given, as before SGCTR existed) or SGCTR. The tag is pydantic's error location
# (`variants.0.test_time.sgctr.pases`); describe_errors drops it, so a typo reads as the key.
_TEST_TIME_MODELS: dict[str, type[BaseModel]] = {"matt": TestTimeConfig, "sgctr": SgctrConfig}


def _test_time_method(v: Any) -> str | None:
    method = v.get("method", "matt") if isinstance(v, dict) else getattr(v, "method", None)
    if method in ("matt", "none"):
        return "matt"
    return "sgctr" if method == "sgctr" else None


TestTimeSetting = Annotated[
    Union[Annotated[TestTimeConfig, Tag("matt")], Annotated[SgctrConfig, Tag("sgctr")]],
    Discriminator(_test_time_method, custom_error_type="test_time_method",
                  custom_error_message="test_time.method must be one of none, matt, sgctr"),
]


class VariantConfig(_Strict):
    """One A/B arm: a model name in the repository, a version (or "latest") and a weight."""

    name: str = "main"
    model: str
    version: int | Literal["latest"] = "latest"
    weight: float = Field(1.0, ge=0)
    # Test-time paths (docs/test-time.md): `{method: matt, paths: 4, trigger: uncertain}`, or
    # SGCTR's refinement graph (docs/sgctr.md): `{method: sgctr, passes: 1}`. None scores
    # plain. Two variants of one model version, one with and one without, make an A/B test
    # of the method itself.
    test_time: TestTimeSetting | None = None


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
    # Pad batches up to a bucket: None = only on CUDA (on CPU the padded rows cost more than
    # a new shape does, see docs/benchmarks.md "Padding").
    pad_to_buckets: bool | None = None
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
    # What to do when Redis does not answer: serve default features (degraded) or refuse.
    on_store_error: Literal["degrade", "reject"] = "degrade"
    # Counted from the send; the loop's own lag is waited out first (service/deadline.py).
    timeout_s: float = Field(0.05, gt=0)
    # An answer is degraded (reason "missing_features") when more than this share of its
    # entities (the user and the items) are unknown to the store; 1 turns it off.
    missing_share_degraded: float = Field(0.5, ge=0, le=1)
    # Redis: the features are not ready without the manifest `ctr features load` writes.
    require_manifest: bool = True
    # Embedded store tables (parquet/csv) used when redis_url is not set.
    users_table: str | None = None
    items_table: str | None = None
    cache_items: int = Field(10_000, ge=0)
    cache_ttl_s: float = Field(30.0, ge=0)


class LimitsConfig(_Strict):
    max_items: int = Field(1000, ge=1)
    max_body_bytes: int = Field(1_000_000, ge=1024)
    # A body still arriving after this long is answered 408 and its connection closed.
    body_timeout_s: float = Field(5.0, gt=0)
    # Admission control (service/admission.py), checked before a body is read: requests and
    # rows in flight, and the expected queue wait (None: the batcher's bound and its deadline).
    max_inflight_requests: int = Field(256, ge=1)
    max_inflight_rows: int | None = Field(None, ge=1)
    max_wait_ms: float | None = Field(None, gt=0)


class ServiceConfig(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid")

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
    # One JSON object per log line (time, level, logger, event, fields) for log pipelines.
    log_format: Literal["text", "json"] = "text"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, v: Any) -> Any:
        return v.upper() if isinstance(v, str) else v

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Flags (init arguments) > environment > config file > defaults."""
        path = _config_file.get()
        if path is None:
            return init_settings, env_settings
        if path.suffix in (".yaml", ".yml"):
            return init_settings, env_settings, YamlConfigSettingsSource(settings_cls, yaml_file=path)
        return init_settings, env_settings, JsonConfigSettingsSource(settings_cls, json_file=path)

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


def load_settings(config: str | Path | None = None, /, *, configure_logging: bool = False, **flags: Any) -> ServiceConfig:
    """The service's settings: `flags` > `CTR_*` environment > config file > defaults.

    `config` is the file named on the command line; without one, `CTR_CONFIG` names it.
    `flags` are command-line values, `section__key` for nested ones; None means "not given".
    With `configure_logging`, the process's logging follows the settings' format and level
    (a serving process calls this once at start).
    """
    path_text = config or os.environ.get(CONFIG_ENV) or None
    path = Path(path_text) if path_text else None
    if path is not None and not path.is_file():
        raise FileNotFoundError(f"config file {path} not found")
    init: dict[str, Any] = {}
    for key, value in flags.items():
        if value is None:
            continue
        section, _, leaf = key.partition("__")
        if leaf:
            init.setdefault(section, {})[leaf] = value
        else:
            init[key] = value
    _check_environment()
    legacy = os.environ.get(LEGACY_REDIS_ENV)
    if legacy and not os.environ.get(f"{ENV_PREFIX}FEATURES__REDIS_URL"):
        features = init.setdefault("features", {})
        if isinstance(features, dict):
            features.setdefault("redis_url", legacy)
    token = _config_file.set(path)
    try:
        cfg = ServiceConfig(**init)
    except ValidationError as exc:
        raise SettingsError(describe_errors(exc, path)) from None
    finally:
        _config_file.reset(token)
    if configure_logging:
        from model.logs import setup_logging

        setup_logging(cfg.log_level, cfg.log_format)
    return cfg


def load_config(path: str | Path | None = None, **overrides: Any) -> ServiceConfig:
    """The settings with `overrides` as flags (kept for the callers of the older name)."""
    return load_settings(path, **overrides)


def _sections() -> dict[str, type[BaseModel]]:
    """Settings fields whose value is a section (a model), by name."""
    out = {}
    for name, f in ServiceConfig.model_fields.items():
        ann = f.annotation
        for t in (ann, *getattr(ann, "__args__", ())):
            if isinstance(t, type) and issubclass(t, BaseModel):
                out[name] = t
    return out


def _check_environment() -> None:
    """Refuse a `CTR_` variable that looks meant for a nested key but misses the `__`.

    pydantic-settings ignores environment variables that match no field (other tools share
    the CTR_ prefix), so `CTR_BATCHER_MAX_BATCH_ROWS=2048` would silently do nothing.
    """
    sections = _sections()
    for name in os.environ:
        if not name.upper().startswith(ENV_PREFIX):
            continue
        rest = name[len(ENV_PREFIX):].lower()
        for section, model in sections.items():
            if rest.startswith(section + "_") and not rest.startswith(section + "__"):
                leaf = rest[len(section) + 1:]
                raise SettingsError(
                    f"environment variable {name} is not a setting: nested keys use '__' "
                    f"(CTR_{section.upper()}__{leaf.upper()}); valid keys under '{section}': {', '.join(model.model_fields)}"
                )


def _model_at(path: list[str]) -> type[BaseModel]:
    """The settings model a key path leads to (list indices skipped): `variants.0.test_time`
    is TestTimeConfig, so an unknown key there lists that section's keys (`variants.0.test_time.sgctr`,
    the union's tag, is SgctrConfig)."""
    model: type[BaseModel] = ServiceConfig
    for i, key in enumerate(path):
        if key.isdigit():
            continue
        if i and path[i - 1] == "test_time" and key in _TEST_TIME_MODELS:
            model = _TEST_TIME_MODELS[key]
            continue
        f = model.model_fields.get(key)
        if f is None:
            break
        if key == "test_time":
            model = TestTimeConfig  # the union's tag, next in the path, may say SGCTR
            continue
        inner = [u for t in (f.annotation, *getattr(f.annotation, "__args__", ()))
                 for u in (t, *getattr(t, "__args__", ())) if isinstance(u, type) and issubclass(u, BaseModel)]
        if not inner:
            break
        model = inner[0]
    return model


def _without_tags(loc: list[str]) -> list[str]:
    """The key path a user wrote: the test_time union's tag (`matt`, `sgctr`) left out."""
    return [k for i, k in enumerate(loc) if not (i and loc[i - 1] == "test_time" and k in _TEST_TIME_MODELS)]


def describe_errors(exc: ValidationError, path: Path | None = None) -> str:
    """One line: every bad key with its problem; unknown keys list the valid ones."""
    parts = []
    for e in exc.errors(include_url=False, include_input=False):
        raw = [str(x) for x in e["loc"]]
        loc = _without_tags(raw)
        where = ".".join(loc) or "settings"
        if e["type"] == "extra_forbidden":
            parent = loc[:-1]
            parent_model = _model_at(raw[:-1])
            scope = f"under '{'.'.join(parent)}'" if parent else "at the top level"
            parts.append(f"unknown key '{where}' (valid keys {scope}: {', '.join(parent_model.model_fields)})")
        else:
            parts.append(f"{where}: {e['msg']}")
    origin = f" (config file {path}, CTR_* environment or flags)" if path else " (CTR_* environment or flags)"
    return "invalid settings" + origin + ": " + "; ".join(parts)
