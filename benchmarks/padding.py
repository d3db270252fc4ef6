"""Padding batches to bucket sizes vs running their exact shape, on onnxruntime CPU.

    python benchmarks/padding.py --models MODELS_DIR --model frappe_dnn --model frappe_dgenctr

Buckets were introduced because a new input shape's first run costs more than later ones
(allocation, kernel selection; on CUDA a graph capture). On CPU the question is whether that
first-run cost is worth paying padded rows on every batch. Per model, with one intra-op thread
(the service's setting per worker), this prints:

* for fixed batch sizes: the median time of the exact shape and of its padded bucket;
* the first run of shapes never seen before, against the same shapes' steady state;
* a stream of batches with random sizes (1..max, as the batcher forms them under varying
  load), run exact and padded alternately: total seconds of each.

Rows of the two runs are the same tokens, so the comparison is only the shape. Times are the
calling thread's CPU time (with one intra-op thread onnxruntime runs the graph on the calling
thread): on a shared machine, wall time of a run longer than a scheduler slice measures the
other processes as much as the model.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BUCKETS = [1, 2, 4, 8, 16, 32, 64, 96, 128, 192, 256, 384, 512, 768, 1024]


def bucket(n: int) -> int:
    return next((b for b in BUCKETS if b >= n), n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", required=True, help="model repository (MODELS/NAME/VERSION)")
    ap.add_argument("--model", action="append", required=True)
    ap.add_argument("--sizes", default="10,100,165,300,500,700,1000")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--stream", type=int, default=400, help="batches in the random-size stream")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import onnxruntime as ort

    from service.package import latest_version, load_package

    out = {}
    for name in args.model:
        pkg = load_package(args.models, name, latest_version(args.models, name))
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = args.threads
        opts.inter_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sess = ort.InferenceSession(str(pkg.onnx_path), opts, providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(0)
        vocab = np.array(pkg.spec.vocab_sizes)
        pool = (rng.random((1024, len(vocab))) * (vocab - 3) + 3).astype(np.int64)

        def run(tokens: np.ndarray) -> float:
            t0 = time.thread_time()
            sess.run([pkg.output_name], {pkg.input_name: tokens})
            return time.thread_time() - t0

        def padded(n: int) -> np.ndarray:
            t = np.zeros((bucket(n), pool.shape[1]), dtype=np.int64)
            t[:n] = pool[:n]
            return t

        res: dict = {"fixed": {}}
        # First runs of unseen shapes (odd sizes no bucket or fixed size uses), then the same again.
        fresh = [37, 111, 223, 333, 451, 613, 877, 999]
        first = [run(pool[:n]) for n in fresh]
        again = [statistics.median(run(pool[:n]) for _ in range(5)) for n in fresh]
        res["new_shape_first_ms"] = {n: round(a * 1e3, 3) for n, a in zip(fresh, first)}
        res["new_shape_steady_ms"] = {n: round(a * 1e3, 3) for n, a in zip(fresh, again)}
        for n in (int(s) for s in args.sizes.split(",")):
            exact, pad = pool[:n].copy(), padded(n)
            run(exact), run(pad)
            e, p = [], []
            for _ in range(args.repeats):  # interleaved, so load on the machine hits both alike
                e.append(run(exact))
                p.append(run(pad))
            res["fixed"][n] = {"bucket": bucket(n), "exact_ms": round(statistics.median(e) * 1e3, 3), "padded_ms": round(statistics.median(p) * 1e3, 3)}
        sizes = rng.integers(1, 1025, args.stream)
        te = tp = 0.0
        for n in sizes.tolist():  # the exact run sees many shapes for the first time
            te += run(pool[:n])
            tp += run(padded(n))
        res["stream"] = {"batches": int(args.stream), "rows": int(sizes.sum()), "exact_s": round(te, 3), "padded_s": round(tp, 3)}
        out[name] = res
        print(f"\n{name} ({pkg.metadata.get('model_type')}), onnxruntime CPU, {args.threads} intra-op thread")
        print(f"{'rows':>6} {'bucket':>6} {'exact ms':>9} {'padded ms':>10} {'padded/exact':>12}   (CPU ms per run)")
        for n, r in res["fixed"].items():
            print(f"{n:>6} {r['bucket']:>6} {r['exact_ms']:>9.3f} {r['padded_ms']:>10.3f} {r['padded_ms'] / r['exact_ms']:>12.2f}")
        print("new shapes, first run vs steady (ms): " + "  ".join(f"{n}: {res['new_shape_first_ms'][n]:.2f}/{res['new_shape_steady_ms'][n]:.2f}" for n in fresh))
        s = res["stream"]
        print(f"random-size stream, {s['batches']} batches, {s['rows']} rows: exact {s['exact_s']:.3f} s, padded {s['padded_s']:.3f} s")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
