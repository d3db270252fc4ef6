"""Test-time paths (MATT) in the service: one variant's extra paths, scored in its usual batches.

A variant with `test_time: {method: matt, ...}` keeps a `MattScorer` (testtime/matt.py, the
code `ctr evaluate` runs) beside its session. A request's token rows are expanded into one
array (the plain rows, then M-1 masked copies of the rows that take paths) and that array is
submitted to the variant's batcher once, so the copies share onnxruntime batches with every
other request's rows; nothing loops over paths. With the `uncertain` trigger the plain score
picks the rows, so the plain rows go first and the extra rows follow in a second submit.
The folded answer has one probability per input row, the shape plain scoring returns.

Paths are sampled from a hash of each row's own tokens, so the service scores a row exactly
as `ctr evaluate` does, whatever else shares its batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from testtime.matt import ExpansionPlan, MattScorer, TestTimeConfig, load_matt

if TYPE_CHECKING:
    from service.metrics import Metrics
    from service.registry import LoadedModel


class TestTimeRefused(Exception):
    """A variant's test-time setting cannot run on this package (no statistics, orders not counted)."""

    __test__ = False


@dataclass
class TestTimePath:
    """A variant's MattScorer and its metric children (bound once, not per request)."""

    __test__ = False

    matt: MattScorer
    rows: Any = None
    rows_with_paths: Any = None
    extra_rows: Any = None

    @property
    def config(self) -> TestTimeConfig:
        return self.matt.config

    def bind(self, metrics: "Metrics", variant: str) -> "TestTimePath":
        method = self.config.method
        self.rows = metrics.test_time_rows.labels(variant, method)
        self.rows_with_paths = metrics.test_time_rows_with_paths.labels(variant, method)
        self.extra_rows = metrics.test_time_extra_rows.labels(variant, method)
        return self

    def record(self, plan: ExpansionPlan) -> None:
        if self.rows is None:
            return
        self.rows.inc(plan.rows)
        if plan.paths > 1 and plan.selected.size:
            self.rows_with_paths.inc(int(plan.selected.size))
            self.extra_rows.inc(plan.extra_rows)

    def describe(self) -> dict[str, Any]:
        c = self.config
        return {"method": c.method, "paths": c.paths, "trigger": c.trigger}


def build_test_time(cfg: TestTimeConfig | None, package_dir: str | Path, metadata: dict[str, Any], spec: Any) -> TestTimePath | None:
    """The variant's test-time path, or None when it scores plain (no setting, method none, M=1).

    Raises TestTimeRefused, naming the package and the fix, when the package cannot serve it.
    """
    if cfg is None or not cfg.active:
        return None
    try:
        matt = load_matt(package_dir, cfg, metadata, spec)
    except (FileNotFoundError, ValueError) as exc:
        raise TestTimeRefused(f"test_time {cfg.method}: {exc}") from exc
    return TestTimePath(matt)


async def score_tokens(model: "LoadedModel", tokens: np.ndarray, deadline: float) -> np.ndarray:
    """Probabilities [rows] for `tokens` through the model's batcher, with its variant's paths.

    Raises the batcher's Overloaded as a plain submit does (a 503 for the caller).
    """
    tt = model.test_time
    if tt is None:
        return await model.batcher.submit(tokens, deadline)
    matt = tt.matt
    if matt.config.needs_plain_scores:
        plain = await model.batcher.submit(tokens, deadline)
        extra, plan = matt.expand(tokens, plain)
        probs = await model.batcher.submit(extra, deadline) if len(extra) else np.empty(0, np.float32)
    else:
        batch, plan = matt.expand(tokens)
        probs = await model.batcher.submit(batch, deadline)
    out = matt.fold(plan, probs)
    tt.record(plan)
    return out
