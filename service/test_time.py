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

A variant with `test_time: {method: sgctr, passes: R, ...}` (docs/sgctr.md) has no extra rows:
its R refinement passes are inside one exported graph (the package's `sgctr/` folder). The
registry opens that graph with the onnxruntime settings of model.onnx and makes it the runner
of the variant's own batcher, so a request's rows share that graph's batched calls with other
requests of the variant; the plain session (shared with the version's plain variants) is not
run for them. `weight: batch` is refused: it blends with the batch's own values, so a row's
score would depend on which requests share its batch.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from testtime.matt import ExpansionPlan, MattScorer, TestTimeConfig, load_matt
from testtime.sgctr import SgctrConfig, graph_path

if TYPE_CHECKING:
    from service.metrics import Metrics
    from service.registry import LoadedModel
    from service.scorer import Scorer

# Opens an ONNX graph of the package with the service's onnxruntime settings (the registry's).
OpenGraph = Callable[[Path], "Scorer"]


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
    model_passes: Any = None
    runner: "Scorer | None" = None  # MATT's rows run on the version's plain session

    @property
    def config(self) -> TestTimeConfig:
        return self.matt.config

    def bind(self, metrics: "Metrics", variant: str) -> "TestTimePath":
        method = self.config.method
        self.rows = metrics.test_time_rows.labels(variant, method)
        self.rows_with_paths = metrics.test_time_rows_with_paths.labels(variant, method)
        self.extra_rows = metrics.test_time_extra_rows.labels(variant, method)
        self.model_passes = metrics.test_time_model_passes.labels(variant, method)
        return self

    def record(self, plan: ExpansionPlan) -> None:
        if self.rows is None:
            return
        self.rows.inc(plan.rows)
        self.model_passes.inc(plan.rows + plan.extra_rows)
        if plan.paths > 1 and plan.selected.size:
            self.rows_with_paths.inc(int(plan.selected.size))
            self.extra_rows.inc(plan.extra_rows)

    def describe(self) -> dict[str, Any]:
        c = self.config
        return {"method": c.method, "paths": c.paths, "trigger": c.trigger}


@dataclass
class SgctrPath:
    """A variant's SGCTR refinement graph: the session its batcher runs, and its metric children."""

    config: SgctrConfig
    runner: "Scorer"  # the refinement graph, opened like model.onnx (threads, providers, buckets)
    entry: dict[str, Any]  # the graph's sgctr.json entry
    runs_per_row: int  # denoiser runs per row inside the graph (plain is 1)
    rows: Any = None
    model_passes: Any = None

    def bind(self, metrics: "Metrics", variant: str) -> "SgctrPath":
        self.rows = metrics.test_time_rows.labels(variant, "sgctr")
        self.model_passes = metrics.test_time_model_passes.labels(variant, "sgctr")
        return self

    def record(self, rows: int) -> None:
        if self.rows is None:
            return
        self.rows.inc(rows)
        self.model_passes.inc(rows * self.runs_per_row)

    def describe(self) -> dict[str, Any]:
        return {**self.config.model_dump(), "graph": self.entry["file"], "runs_per_row": self.runs_per_row,
                "provider": self.runner.provider}


def build_test_time(cfg: TestTimeConfig | SgctrConfig | None, package_dir: str | Path, metadata: dict[str, Any], spec: Any,
                    open_graph: OpenGraph | None = None) -> TestTimePath | SgctrPath | None:
    """The variant's test-time path, or None when it scores plain (no setting, method none, M=1, R=0).

    Raises TestTimeRefused, naming the package and the fix, when the package cannot serve it.
    `open_graph` opens SGCTR's refinement graph (required for method sgctr).
    """
    if cfg is None or not cfg.active:
        return None
    if isinstance(cfg, SgctrConfig):
        if open_graph is None:
            raise TypeError("build_test_time: method sgctr needs open_graph")
        return _build_sgctr(cfg, Path(package_dir), spec, open_graph)
    try:
        matt = load_matt(package_dir, cfg, metadata, spec)
    except (FileNotFoundError, ValueError) as exc:
        raise TestTimeRefused(f"test_time {cfg.method}: {exc}") from exc
    return TestTimePath(matt)


def export_command(cfg: SgctrConfig, package_dir: Path) -> str:
    """The `ctr sgctr export` command line that adds the graph `cfg` asks for to the package."""
    sets = "".join(f" --set {k}={json.dumps(v) if not isinstance(v, str) else v}"
                   for k, v in cfg.model_dump(exclude_defaults=True, exclude={"method", "passes"}).items())
    return f"ctr sgctr export --run RUN_DIR --package {package_dir} --passes {cfg.passes}{sets}"


def _build_sgctr(cfg: SgctrConfig, package_dir: Path, spec: Any, open_graph: OpenGraph) -> SgctrPath:
    if cfg.weight == "batch":
        raise TestTimeRefused("test_time sgctr: weight=batch blends with the values of the rows that share a batch, so a "
                              "served score would depend on other requests; serve weight full, relative or zero")
    try:
        path, entry = graph_path(package_dir, cfg)
    except FileNotFoundError as exc:  # no sgctr.json: the message names the export command
        raise TestTimeRefused(f"test_time sgctr: {exc}") from exc
    except ValueError as exc:
        # The command first: the load warning keeps only the first 300 characters.
        raise TestTimeRefused(f"test_time sgctr: export the graph with `{export_command(cfg, package_dir)}`: {exc}") from exc
    try:
        runner = open_graph(path)
    except Exception as exc:  # onnxruntime refuses a damaged graph with many exception types
        raise TestTimeRefused(f"test_time sgctr: {path} does not load: {exc}") from exc
    if runner.num_fields is not None and runner.num_fields != spec.num_fields:
        raise TestTimeRefused(f"test_time sgctr: {path} takes {runner.num_fields} fields, the spec has {spec.num_fields}")
    runs = int(entry.get("runs_per_row") or cfg.runs_per_row(spec.num_fields))
    return SgctrPath(cfg, runner, entry, runs)


async def score_tokens(model: "LoadedModel", tokens: np.ndarray, deadline: float) -> np.ndarray:
    """Probabilities [rows] for `tokens` through the model's batcher, with its variant's paths.

    Raises the batcher's Overloaded as a plain submit does (a 503 for the caller).
    """
    tt = model.test_time
    if tt is None:
        return await model.batcher.submit(tokens, deadline)
    if isinstance(tt, SgctrPath):  # the variant's batcher runs the refinement graph
        probs = await model.batcher.submit(tokens, deadline)
        tt.record(len(tokens))
        return probs
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
