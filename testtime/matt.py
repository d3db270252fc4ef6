"""MATT's confidence-guided inference paths: expand a token batch, score it once, fold it back.

The service and `ctr evaluate` use this one code path. `expand` turns a batch [B, F] into one
stacked batch (the plain rows, then M-1 masked copies of the rows that take extra paths), so
all paths go through the same batched onnxruntime call as everything else; `fold` averages
each row's paths back into one probability per row. Nothing loops over paths in Python.

Sampling is counter-based: the uniform number that decides whether field f of path m of a row
is kept is a hash of (seed, the row's tokens, m, f). A row therefore gets the same paths
whatever batch it arrives in, so the service and `ctr evaluate` score it identically.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from model.spec import MASK_ID, NUM_RESERVED, OOV_ID
from testtime.combos import _GOLDEN, _splitmix
from testtime.confidence import ComboIndex
from testtime.stats import STATS_FILE, ComboStats


class TestTimeConfig(BaseModel):
    """Per-variant test-time settings (`test_time:` in a service variant, `--set` in `ctr evaluate`)."""

    model_config = ConfigDict(extra="forbid")
    __test__ = False  # not a pytest class, despite the name

    method: Literal["none", "matt"] = "matt"
    paths: int = Field(8, ge=1, le=64, description="M, path 0 (the full row) included")
    trigger: Literal["all", "uncertain"] = "all"
    # Defaults chosen on Frappe_x1's validation split (docs/test-time.md §6, preliminary).
    kappa: list[float] = Field(default_factory=lambda: [0.5],
                               description="f/(f+kappa) per order (1, 2, 3); one value for all orders also works")
    orders: list[int] = Field(default_factory=lambda: [1, 2, 3])
    frequency: Literal["lower", "upper"] = "upper"
    heavy_hitters: bool = Field(True, description="read the heavy-hitter summary; False: the count-min sketch alone (ablation)")
    field_agg: Literal["mean", "min"] = "mean"
    keep_above: float = Field(0.95, ge=0.0, le=1.0, description="fields this confident are never replaced")
    sampling: Literal["confidence", "uniform"] = "confidence"
    uniform_keep: float = Field(0.8, ge=0.0, le=1.0, description="keep probability of every field when sampling=uniform")
    aggregate: Literal["mean", "weighted"] = "mean"
    replacement: Literal["auto", "oov", "mask"] = "oov"
    uncertain_min_conf: float = Field(0.0, ge=0.0, le=1.0, description="trigger: some field less confident than this (0: off)")
    uncertain_logit_band: float = Field(3.0, ge=0.0,
                                        description="trigger: |logit(p) - logit(train positive rate)| below this (0: off)")
    seed: int = 0

    @field_validator("kappa", mode="before")
    @classmethod
    def _scalar_kappa(cls, v: Any) -> Any:
        return [v] if isinstance(v, (int, float)) else v

    @field_validator("kappa")
    @classmethod
    def _positive_kappa(cls, v: list[float]) -> list[float]:
        if not v or any(k < 0 for k in v):
            raise ValueError("kappa must hold one or more values >= 0")
        return v

    @field_validator("orders")
    @classmethod
    def _orders(cls, v: list[int]) -> list[int]:
        if not v or not set(v) <= {1, 2, 3}:
            raise ValueError("orders must be a non-empty subset of [1, 2, 3]")
        return sorted(set(v))

    @property
    def active(self) -> bool:
        return self.method == "matt" and self.paths > 1

    @property
    def needs_plain_scores(self) -> bool:
        """The uncertainty band reads the plain prediction, so plain rows are scored first."""
        return self.active and self.trigger == "uncertain" and self.uncertain_logit_band > 0


def replacement_token(metadata: dict[str, Any], choice: str = "auto") -> int:
    """The token a dropped field becomes. MASK_ID only where the exported graph learned it: the
    baselines trained with --field-mask-rate saw MASK_ID tokens. DGenCTR's learned [MASK] is
    a separate embedding its exported graph cannot reach through tokens, so it gets OOV, as
    does every model trained without masking (OOV is what it saw for rare values)."""
    if choice == "mask":
        return MASK_ID
    if choice == "oov":
        return OOV_ID
    metrics = metadata.get("metrics") or {}
    variant = str(metrics.get("variant") or "")
    model_type = str(metadata.get("model_type") or metrics.get("model") or "")
    return MASK_ID if "-fmask" in variant and model_type != "dgenctr" else OOV_ID


@dataclass
class ExpansionPlan:
    """How to fold scores of an expanded batch back to one probability per input row."""

    rows: int  # B
    selected: np.ndarray  # indices of rows with extra paths
    paths: int  # M (path 0 included)
    plain_in_batch: bool  # the batch starts with the B plain rows
    plain: np.ndarray | None  # plain probabilities when they were scored before expand
    weights: np.ndarray | None  # [n_selected, M] path weights (aggregate=weighted)

    @property
    def extra_rows(self) -> int:
        return int(self.selected.size * (self.paths - 1))


@dataclass
class MattCounters:
    rows: int = 0
    rows_with_paths: int = 0
    extra_rows: int = 0

    def as_dict(self) -> dict[str, float]:
        return {"rows": self.rows, "rows_with_paths": self.rows_with_paths, "extra_rows": self.extra_rows,
                "share_with_paths": self.rows_with_paths / self.rows if self.rows else 0.0,
                "model_rows_per_row": (self.rows + self.extra_rows) / self.rows if self.rows else 0.0}


@dataclass
class MattScorer:
    index: ComboIndex
    config: TestTimeConfig
    replacement: int = OOV_ID
    counters: MattCounters = field(default_factory=MattCounters)

    @classmethod
    def from_stats(cls, stats: ComboStats, config: TestTimeConfig, replacement: int = OOV_ID) -> "MattScorer":
        missing = set(config.orders) - set(stats.layouts)
        if missing:
            raise ValueError(f"test_time orders {sorted(missing)} were not counted in the statistics (built: {sorted(stats.layouts)})")
        return cls(ComboIndex(stats), config, replacement)

    @property
    def positive_rate(self) -> float:
        return self.index.stats.positive_rate

    def confidence(self, tokens: np.ndarray) -> np.ndarray:
        c = self.config
        return self.index.field_confidence(tokens, c.kappa, c.orders, c.frequency, c.field_agg, c.heavy_hitters)

    def select(self, tokens: np.ndarray, conf: np.ndarray | None, plain: np.ndarray | None) -> np.ndarray:
        """Rows that take extra paths. `conf` may be None when the confidence criterion is off."""
        n = len(tokens)
        if self.config.trigger == "all":
            return np.arange(n)
        uncertain = np.zeros(n, dtype=bool)
        if self.config.uncertain_min_conf > 0 and conf is not None:
            uncertain |= conf.min(axis=1) < self.config.uncertain_min_conf
        if plain is not None and self.config.uncertain_logit_band > 0:
            rate = self.positive_rate
            center = np.log(rate / (1 - rate)) if 0 < rate < 1 else 0.0
            p = np.clip(np.asarray(plain, dtype=np.float64), 1e-7, 1 - 1e-7)
            uncertain |= np.abs(np.log(p / (1 - p)) - center) < self.config.uncertain_logit_band
        return np.flatnonzero(uncertain)

    def expand(self, tokens: np.ndarray, plain: np.ndarray | None = None) -> tuple[np.ndarray, ExpansionPlan]:
        """(batch, plan). Without `plain`, batch = the B plain rows then the extra rows; with the
        plain probabilities already scored, batch = the extra rows only."""
        tokens = np.ascontiguousarray(tokens, dtype=np.int64)
        b, f = tokens.shape
        m = self.config.paths
        empty = np.empty(0, np.int64)
        if not self.config.active or b == 0:
            plan = ExpansionPlan(b, empty, 1, plain is None, plain, None)
            self._count(plan)
            return (tokens if plain is None else tokens[:0]), plan
        if self.config.needs_plain_scores and plain is None:
            raise ValueError("trigger=uncertain with a logit band needs the plain scores: expand(tokens, plain)")
        if self.config.trigger == "uncertain" and self.config.uncertain_min_conf <= 0:
            # The plain score alone selects: look up confidences for the selected rows only.
            sel = self.select(tokens, None, plain)
            rows = tokens[sel]
            conf_sel = self.confidence(rows) if len(rows) else np.zeros(rows.shape)
        else:
            conf = self.confidence(tokens)
            sel = self.select(tokens, conf, plain)
            rows, conf_sel = tokens[sel], conf[sel]
        u = self._uniforms(rows, m - 1)  # [n, M-1, F]
        if self.config.sampling == "confidence":
            keep = (u < conf_sel[:, None, :]) | (conf_sel[:, None, :] >= self.config.keep_above)
        else:  # the ablation: same M, every field kept with one probability
            keep = u < self.config.uniform_keep
        keep |= rows[:, None, :] < NUM_RESERVED  # PAD/OOV/MASK: nothing to distrust
        extra = np.where(keep, rows[:, None, :], self.replacement).reshape(-1, f)
        weights = None
        if self.config.aggregate == "weighted":
            w0 = conf_sel.mean(axis=1, keepdims=True)
            kept_conf = (conf_sel[:, None, :] * keep).sum(axis=2) / np.maximum(keep.sum(axis=2), 1)
            weights = np.concatenate([w0, kept_conf], axis=1) + 1e-6
        batch = extra if plain is not None else np.concatenate([tokens, extra], axis=0)
        plan = ExpansionPlan(b, sel, m, plain is None, None if plain is None else np.asarray(plain), weights)
        self._count(plan)
        return batch, plan

    def fold(self, plan: ExpansionPlan, probs: np.ndarray) -> np.ndarray:
        probs = np.asarray(probs, dtype=np.float32).reshape(-1)
        if plan.plain_in_batch:
            plain, extra = probs[: plan.rows], probs[plan.rows :]
        else:
            plain, extra = np.asarray(plan.plain, dtype=np.float32), probs
        if extra.size != plan.extra_rows:
            raise ValueError(f"expected {plan.extra_rows} extra scores, got {extra.size}")
        out = plain.copy()
        if plan.selected.size and plan.paths > 1:
            paths = np.concatenate([plain[plan.selected, None], extra.reshape(plan.selected.size, plan.paths - 1)], axis=1)
            if plan.weights is None:
                out[plan.selected] = paths.mean(axis=1)
            else:
                out[plan.selected] = (paths * plan.weights).sum(axis=1) / plan.weights.sum(axis=1)
        return out

    def score(self, tokens: np.ndarray, score_fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        """expand, one scoring call (two when the trigger reads the plain score), fold."""
        plain = score_fn(tokens) if self.config.needs_plain_scores else None
        batch, plan = self.expand(tokens, plain)
        probs = score_fn(batch) if len(batch) else np.empty(0, np.float32)
        return self.fold(plan, probs)

    def _count(self, plan: ExpansionPlan) -> None:
        self.counters.rows += plan.rows
        self.counters.rows_with_paths += int(plan.selected.size) if plan.paths > 1 else 0
        self.counters.extra_rows += plan.extra_rows

    def _uniforms(self, rows: np.ndarray, paths: int) -> np.ndarray:
        """[n, paths, F] uniforms in [0, 1) from (seed, row tokens, path, field): batch-independent."""
        n, f = rows.shape
        with np.errstate(over="ignore"):
            h = np.full(n, np.uint64(self.config.seed) * _GOLDEN + _GOLDEN, dtype=np.uint64)
            for k in range(f):
                h = _splitmix(h ^ (rows[:, k].astype(np.uint64) + np.uint64(k + 1) * _GOLDEN))
            idx = np.arange(1, paths * f + 1, dtype=np.uint64).reshape(1, paths, f)
            bits = _splitmix(h[:, None, None] ^ (idx * _GOLDEN))
        return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def load_matt(package_dir: str | Path, config: TestTimeConfig, metadata: dict[str, Any] | None = None,
              spec: Any = None) -> MattScorer:
    """The MattScorer of a package folder (its statistics file must be present and intact)."""
    import json

    p = Path(package_dir)
    stats_path = p / STATS_FILE
    if not stats_path.is_file():
        raise FileNotFoundError(f"{p} has no {STATS_FILE}: build it with `ctr stats build --package {p}`")
    if metadata is None:
        metadata = json.loads((p / "metadata.json").read_text(encoding="utf-8"))
    stats = ComboStats.load(stats_path, spec)
    return MattScorer.from_stats(stats, config, replacement_token(metadata, config.replacement))
