"""onnxruntime (CPU) vs torch eager scoring throughput for exported runs, side by side.

For each run: export it to a temporary repository, then score the same random valid token
batches with onnxruntime and with the torch model in eval/inference mode, both on the same
number of threads, their timing blocks interleaved. Prints rows/s per batch size, the ratio,
and the size of model.onnx (plus the int8 package's speed and AUC change with --int8).

    python benchmarks/export_speed.py --run runs/dnn --run runs/dgenctr [--threads 2] [--int8]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np


def rows_per_s(fns: dict[str, object], rows: int, min_seconds: float, repeats: int) -> dict[str, float]:
    """Median rows/s per function over `repeats` timed blocks of at least `min_seconds` each.

    The functions' blocks are interleaved (A B A B ...), so load from other processes on a
    shared machine hits both sides alike and the ratio stays meaningful.
    """
    for fn in fns.values():
        fn()  # warm-up
    rates: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            n, t0 = 0, time.perf_counter()
            while True:
                fn()
                n += 1
                dt = time.perf_counter() - t0
                if dt >= min_seconds:
                    break
            rates[key].append(n * rows / dt)
    return {k: statistics.median(v) for k, v in rates.items()}


def bench_run(run_dir: str, batches: list[int], threads: int, min_seconds: float, repeats: int, int8: bool) -> list[str]:
    import onnxruntime as ort
    import torch

    from export.onnx_export import ExportOptions, export_run
    from export.package import random_valid_tokens
    from export.parity import ProbabilityHead
    from model.run_io import load_run

    torch.set_num_threads(threads)
    run = load_run(run_dir)
    head = ProbabilityHead(run.model).eval()
    lines = []
    with tempfile.TemporaryDirectory(prefix="export-speed-") as repo:
        pkgs = {"fp32": export_run(run_dir, repo, "bench")}
        if int8:
            pkgs["int8"] = export_run(run_dir, repo, "bench", options=ExportOptions(precision="int8"))
        sessions = {}
        for prec, pkg in pkgs.items():
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
            sessions[prec] = ort.InferenceSession(str(pkg.onnx_path), opts, providers=["CPUExecutionProvider"])
        model_type = pkgs["fp32"].model_type
        sizes = {p: pkg.onnx_path.stat().st_size for p, pkg in pkgs.items()}
        rng = np.random.default_rng(0)
        header = "| model | batch | onnxruntime rows/s | torch eager rows/s | ratio |" + (" int8 rows/s | int8 ratio |" if int8 else "")
        lines += [header, "|" + "---|" * (header.count("|") - 1)]
        for b in batches:
            tokens = random_valid_tokens(run.spec, b, rng)
            t_tokens = torch.from_numpy(tokens)

            def torch_call() -> None:
                with torch.inference_mode():
                    head(t_tokens)

            fns = {"ort": lambda: sessions["fp32"].run(["probability"], {"tokens": tokens}), "torch": torch_call}
            if int8:
                fns["int8"] = lambda: sessions["int8"].run(["probability"], {"tokens": tokens})
            rate = rows_per_s(fns, b, min_seconds, repeats)
            ort_rate, torch_rate = rate["ort"], rate["torch"]
            line = f"| {model_type} | {b} | {ort_rate:,.0f} | {torch_rate:,.0f} | {ort_rate / torch_rate:.2f}x |"
            if int8:
                line += f" {rate['int8']:,.0f} | {rate['int8'] / ort_rate:.2f}x vs fp32 |"
            lines.append(line)
            print(line, flush=True)
        size_line = f"model.onnx ({model_type}): fp32 {sizes['fp32'] / 1e6:.2f} MB" + (
            f", int8 {sizes['int8'] / 1e6:.2f} MB" if int8 else "")
        lines.append(size_line)
        if int8:
            ev = pkgs["int8"].metadata.get("precision_eval") or {}
            if "auc_delta" in ev:
                lines.append(f"int8 valid AUC change ({model_type}): {ev['auc_delta']:+.6f} ({ev['auc']:.6f} vs {ev['auc_fp32']:.6f}, {ev['rows']} rows)")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", action="append", required=True, help="training run directory (repeatable)")
    ap.add_argument("--batches", default="1,64,512,4096")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads for both onnxruntime and torch")
    ap.add_argument("--min-seconds", type=float, default=0.5, help="time per measurement block")
    ap.add_argument("--repeats", type=int, default=5, help="blocks per cell (median reported)")
    ap.add_argument("--int8", action="store_true", help="also time the dynamic-int8 package")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    out: list[str] = []
    for run in args.run:
        print(f"# {run} (threads={args.threads})", flush=True)
        out += bench_run(run, batches, args.threads, args.min_seconds, args.repeats, args.int8) + [""]
    print("\n".join(out))


if __name__ == "__main__":
    main()
