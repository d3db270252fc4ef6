"""Measure the statistics build and lookup: vectorised numpy vs Apache DataSketches.

    python -m testtime.bench --spec frappe_x1 --data ../shared/data/frappe_x1 [--package MODELS/NAME/V]

Prints JSON: build rows/s on one core for each implementation (same combinations, same
depth/width) in CPU seconds of this process, the lookup cost per scored row, and, with a package, the model's own time per
row at the same batch sizes, so the lookup share of a request can be read off. DataSketches
is optional (`pip install datasketches`); without it only numpy is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np


# CPU seconds of this process, not wall time: on a shared machine the wall clock counts the
# time other processes held the core, and "rows/s per core" is about this process's own work.
_clock = time.process_time


def _best(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = _clock()
        fn()
        best = min(best, _clock() - t)
    return best


def bench(spec_arg: str, data: str, package: str | None, rows: int, ds_rows: int, batches: list[int],
          config: Any = None, datasketches: bool = True) -> dict[str, Any]:
    from model.readers import read_table, split_path
    from model.spec import FeatureSpec
    from testtime.matt import MattScorer, TestTimeConfig
    from testtime.stats import StatsBuilder, StatsConfig

    src = Path(data)
    train = read_table(split_path(src, "train") if src.is_dir() else src)
    spec = FeatureSpec.load(spec_arg)
    spec = spec if spec.fitted else spec.fit(train)
    tokens = spec.encode(train)
    if rows > len(tokens):  # repeat the log to reach the requested size
        tokens = np.tile(tokens, (int(np.ceil(rows / len(tokens))), 1))
    tokens = tokens[:rows]
    cfg = config or StatsConfig()
    out: dict[str, Any] = {"rows": int(len(tokens)), "fields": spec.num_fields, "config": {
        "depth": cfg.depth, "width_log2": cfg.width_log2, "heavy_capacity": cfg.heavy_capacity,
        "pair_top_k": cfg.pair_top_k, "triple_top_k": cfg.triple_top_k, "chunk_rows": cfg.chunk_rows}}

    # The first build also pays for faulting in the freshly allocated tables (a fixed cost, not
    # a per-row one), so it is reported apart from the best of the repeats (the steady state a
    # log much larger than this sample sees).
    times = []
    for _ in range(3):
        builder = StatsBuilder(spec, cfg)
        t = _clock()
        builder.add(tokens)
        stats = builder.finish()
        times.append(_clock() - t)
    out["combinations"] = {str(o): lay.size for o, lay in builder.layouts.items()}
    out["numpy_build_rows_per_s"] = round(len(tokens) / min(times))
    out["numpy_build_rows_per_s_first_run"] = round(len(tokens) / times[0])

    # Per order, numpy without the heavy-hitter summary (the sketch alone), for the breakdown.
    sketch_only = {}
    columns = np.ascontiguousarray(tokens.T)
    for o, lay in builder.layouts.items():
        if o == 1:
            continue
        from testtime.sketch import CountMinSketch

        cms = CountMinSketch.empty(cfg.depth, 1 << cfg.width_log2, 1)
        t = _clock()
        for lo in range(0, len(tokens), cfg.chunk_rows):
            cms.update(lay.keys_t(np.ascontiguousarray(columns[:, lo : lo + cfg.chunk_rows])).reshape(-1))
        sketch_only[str(o)] = round(len(tokens) / (_clock() - t))
    out["numpy_sketch_only_rows_per_s_by_order"] = sketch_only

    scorer = MattScorer.from_stats(stats, TestTimeConfig())
    lookup = {}
    for b in batches:
        batch = tokens[:b]
        lookup[str(b)] = round(_best(lambda: scorer.confidence(batch), 5) / b * 1e6, 3)
    out["numpy_lookup_us_per_row"] = lookup

    try:
        if not datasketches:
            raise ImportError
        import datasketches as ds
    except ImportError:
        out["datasketches"] = "not measured (not installed or --no-datasketches)"
    else:
        sub = tokens[:ds_rows]
        keys = {o: lay.keys(sub).view(np.int64) for o, lay in builder.layouts.items() if o > 1}  # the bindings take int64
        cms_ds = {o: ds.count_min_sketch(cfg.depth, 1 << cfg.width_log2, 1) for o in keys}
        fi = {o: ds.frequent_items_sketch(16) for o in keys}  # 2^16 map, as heavy_capacity
        single = np.zeros(int(sum(spec.vocab_sizes)), np.int64)
        offsets = np.concatenate([[0], np.cumsum(spec.vocab_sizes)[:-1]])
        t = _clock()
        single += np.bincount((sub + offsets).reshape(-1), minlength=single.size)  # order 1 exact either way
        for o, k in keys.items():
            c, f = cms_ds[o], fi[o]
            for key in k.reshape(-1).tolist():
                c.update(key)
                f.update(str(key))
        ds_s = _clock() - t
        out["datasketches_build_rows_per_s"] = round(len(sub) / ds_s)
        out["datasketches_rows_measured"] = int(len(sub))
        ds_lookup = {}
        for b in batches[:2]:
            batch_keys = {o: k[:b].reshape(-1).tolist() for o, k in keys.items()}

            def run() -> None:
                for o, kl in batch_keys.items():
                    c, f = cms_ds[o], fi[o]
                    for key in kl:
                        c.get_estimate(key)
                        f.get_estimate(str(key))

            ds_lookup[str(b)] = round(_best(run, 3) / b * 1e6, 3)
        out["datasketches_lookup_us_per_row"] = ds_lookup

    if package:
        from export.offline_scorer import OfflineScorer

        model = OfflineScorer(package, intra_op_threads=1)
        model_cost = {}
        for b in batches:
            batch = np.ascontiguousarray(tokens[:b])
            model.score_tokens(batch)
            model_cost[str(b)] = round(_best(lambda: model.score_tokens(batch), 5) / b * 1e6, 3)
        out["model_us_per_row_1_thread"] = model_cost
        out["lookup_share_of_model_time"] = {b: round(lookup[b] / model_cost[b], 3) for b in model_cost}
    return out


def main() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--spec", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--package")
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--datasketches-rows", type=int, default=20_000)
    p.add_argument("--batches", default="64,256,1024")
    p.add_argument("--heavy", type=int, help="heavy hitters per order (default: StatsConfig's)")
    p.add_argument("--chunk-rows", type=int, help="rows per counting chunk (default: StatsConfig's)")
    p.add_argument("--no-datasketches", action="store_true")
    a = p.parse_args()
    from testtime.stats import StatsConfig

    over = {k: v for k, v in (("heavy_capacity", a.heavy), ("chunk_rows", a.chunk_rows)) if v}
    print(json.dumps(bench(a.spec, a.data, a.package, a.rows, a.datasketches_rows,
                           [int(b) for b in a.batches.split(",")], StatsConfig(**over), not a.no_datasketches), indent=2))


if __name__ == "__main__":
    main()
