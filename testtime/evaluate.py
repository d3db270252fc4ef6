"""`ctr evaluate`: score a data split with a model package through onnxruntime, plain, MATT or SGCTR.

Torch-free: the package is read by `export.offline_scorer.OfflineScorer` (the one raw-rows
scorer the service's parity test also uses) and the paths come from `testtime.matt`, the code
the service runs, so an offline figure is the served model's figure.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from testtime.matt import MattScorer, TestTimeConfig, load_matt
from testtime.sgctr import SgctrConfig, SgctrScorer, load_sgctr


def parse_sets(pairs: list[str] | None) -> dict[str, Any]:
    """`--set key=value` pairs; values are read as JSON when they parse (numbers, lists), else strings."""
    out: dict[str, Any] = {}
    for item in pairs or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects key=value, got {item!r}")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def evaluate_package(
    package: str | Path,
    data: str | Path,
    split: str = "test",
    test_time: TestTimeConfig | SgctrConfig | None = None,
    *,
    max_rows: int | None = None,
    chunk_rows: int = 4096,
    threads: int | None = None,
    noise: float = 0.0,
    noise_seed: int = 0,
) -> dict[str, Any]:
    from export.offline_scorer import OfflineScorer
    from model.metrics import evaluate
    from model.readers import read_table, split_path

    scorer = OfflineScorer(package, intra_op_threads=threads, chunk_rows=max(chunk_rows, 1))
    spec = scorer.spec
    src = Path(data)
    path = split_path(src, split) if src.is_dir() else src
    table = read_table(path)
    if max_rows:
        table = table.iloc[:max_rows]
    if spec.label not in table.columns:
        raise ValueError(f"label column '{spec.label}' is not in {path}")
    labels = table[spec.label].to_numpy().astype(np.int64)
    groups = table[spec.group].astype(str).to_numpy() if spec.group and spec.group in table.columns else None
    tokens = scorer.encode(table)
    noise_report = None
    if noise > 0:  # the noise stress test (testtime/noise.py): same rows, a share of fields replaced
        from testtime.noise import corrupt_tokens

        tokens, _, noise_report = corrupt_tokens(tokens, noise, noise_seed, vocab_sizes=spec.vocab_sizes)

    cfg = test_time or TestTimeConfig(method="none")
    matt: MattScorer | None = None
    sgctr: SgctrScorer | None = None
    if isinstance(cfg, SgctrConfig):
        sgctr = load_sgctr(scorer.package.path, cfg, threads=threads) if cfg.active else None
    elif cfg.active:
        matt = load_matt(scorer.package.path, cfg, scorer.package.metadata, spec)
    probs = np.empty(len(tokens), dtype=np.float32)
    model_rows = 0

    def score_fn(batch: np.ndarray) -> np.ndarray:
        nonlocal model_rows
        model_rows += len(batch)
        return scorer.score_tokens(batch)

    start = time.perf_counter()
    for lo in range(0, len(tokens), chunk_rows):
        chunk = tokens[lo : lo + chunk_rows]
        if sgctr is not None:
            model_rows += len(chunk) * sgctr.runs_per_row
            probs[lo : lo + len(chunk)] = sgctr.score(chunk)
        else:
            probs[lo : lo + len(chunk)] = matt.score(chunk, score_fn) if matt is not None else score_fn(chunk)
    seconds = time.perf_counter() - start
    metrics = evaluate(labels, probs, groups, with_gauc=groups is not None)
    out: dict[str, Any] = {
        "package": str(scorer.package.path),
        "model_type": scorer.package.model_type,
        "split": split,
        "data": str(path),
        "rows": int(len(tokens)),
        "auc": metrics["auc"],
        "logloss": metrics["logloss"],
        "gauc": metrics["gauc"] if groups is not None else None,
        "gauc_group": spec.group if groups is not None else None,
        "rows_per_second": len(tokens) / seconds if seconds > 0 else None,
        "model_rows": model_rows,
        "model_rows_per_row": model_rows / len(tokens) if len(tokens) else None,
        "share_with_extra_paths": matt.counters.as_dict()["share_with_paths"] if matt is not None else 0.0,
        "test_time": cfg.model_dump() if cfg.active else {"method": "none"},
        "noise": noise_report.as_dict() if noise_report is not None else None,
    }
    if matt is not None:
        out["replacement_token"] = matt.replacement
    return {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in out.items()}
