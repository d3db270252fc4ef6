"""Encode throughput: FeatureSpec.encode rows/s on real and synthetic tables.

Prints a side-by-side table for the three shapes that matter: a training split (DataFrame
columns), a serving request (list of row dicts, as JSON arrives) and a wide synthetic table
with numeric buckets and a cross. Run: `python benchmarks/encode.py [--rows 100000]`.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from model.readers import read_table
from model.spec import FeatureSpec
from model.synth import SynthConfig, generate

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "frappe_x1"


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    cases: list[tuple[str, FeatureSpec, object, int]] = []
    if (SHARED / "train.csv").exists():
        frappe = read_table(SHARED / "train.csv").iloc[: args.rows]
        spec = FeatureSpec.load("frappe_x1").fit(frappe)
        cases.append(("frappe_x1 DataFrame (10 cat)", spec, frappe, len(frappe)))
        req = frappe.iloc[:100].drop(columns="label").to_dict("records")
        cases.append(("frappe_x1 request, 100 dicts (ints)", spec, req, 100))
        req_str = [{k: str(v) for k, v in r.items()} for r in req]
        cases.append(("frappe_x1 request, 100 dicts (strs)", spec, req_str, 100))
    synth = generate(SynthConfig(seed=1, rows=max(args.rows, 10_000) * 10 // 7 + 10))["train"].iloc[: args.rows]
    sspec = FeatureSpec.load("synthetic").fit(synth)
    cases.append(("synthetic DataFrame (12: num+cross)", sspec, synth, len(synth)))

    print(f"{'case':40s} {'rows':>8s} {'median s':>10s} {'rows/s':>12s}")
    for name, spec, table, n in cases:
        spec.encode(table)  # warm the vocabulary indexes
        t = best_of(lambda: spec.encode(table), args.repeats if n > 1000 else 200)
        print(f"{name:40s} {n:8d} {t:10.5f} {n / t:12,.0f}")


if __name__ == "__main__":
    main()
