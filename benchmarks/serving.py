"""Serving benchmark: raw onnxruntime ceiling vs the service, batched and unbatched.

    python benchmarks/serving.py --redis redis://127.0.0.1:6379/0 [--models MODELS_DIR --model NAME ...]

In one run, per model: (a) raw onnxruntime rows/s in-process at the batch sizes the batcher
forms (the ceiling); (b) the service at saturation with 100-candidate requests (closed loop):
rows/s, p50, p99; (c) the same with batching off, at 100 and at 10 candidates; (d) p50/p99 in
an open loop at 50% and 10% of (b)'s request rate, batched and unbatched; and the CPU cost per
request outside the model (parse, feature fetch, encode, response), measured in-process.

Without --models it scores Frappe with a DNN-shaped ONNX graph (10 fields, emb 10,
400-400-400, random weights): the reference scorer's compute cost without a training run.
Everything runs on loopback; the server is a `ctr serve` subprocess; the load generator is a
minimal keep-alive HTTP/1.1 client in this process (httpx would be the bottleneck). Redis keys
go under a fresh prefix and are deleted at the end. Every phase is bounded by --duration.

With `--test-time '{"paths": 4, "trigger": "all"}'` (any TestTimeConfig keys) it runs MATT on
vs off instead: one server with two variants of the same version, plain and MATT (statistics
are built into the package first when it has none), each at saturation and then both at 50%
of the plain variant's saturation rate (open loop), side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import orjson
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
FRAPPE = ROOT.parent / "shared" / "data" / "frappe_x1"


# ---------------------------------------------------------------- data and models
def frappe_setup(work: Path, redis_url: str, prefix: str, rows: int):
    from model.readers import read_table
    from model.spec import FeatureSpec
    from service.features import bulk_load

    train = read_table(FRAPPE / "train.csv")
    spec = FeatureSpec.load("frappe_x1").fit(train)
    users = train[["user"]].drop_duplicates()
    items = train[["item", "cost"]].drop_duplicates("item")
    users.to_parquet(work / "users.parquet", index=False)
    items.to_parquet(work / "items.parquet", index=False)
    bulk_load(work / "users.parquet", "user", redis_url, prefix)
    bulk_load(work / "items.parquet", "item", redis_url, prefix)
    ctx_cols = spec.fields_from("context")
    return spec, users["user"].to_numpy(), items["item"].to_numpy(), train[ctx_cols].iloc[:rows]


def bodies(users, items, ctx: pd.DataFrame, n_items: int, count: int, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    out = []
    records = ctx.to_dict("records")
    for i in range(count):
        body = {
            "user_id": int(users[rng.integers(len(users))]),
            "context": {k: (int(v) if isinstance(v, (np.integer, int)) else v) for k, v in records[rng.integers(len(records))].items()},
            "items": [{"item_id": int(x)} for x in items[rng.choice(len(items), n_items, replace=n_items > len(items))]],
        }
        out.append(orjson.dumps(body))
    return out


# ---------------------------------------------------------------- load generator
class Conn:
    """One keep-alive HTTP/1.1 connection that sends pre-serialised POST /score requests."""

    def __init__(self, port: int) -> None:
        self.port = port

    async def open(self) -> "Conn":
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        return self

    async def post(self, body: bytes) -> int:
        head = b"POST /score HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
        self.writer.write(head + body)
        status_line = await self.reader.readline()
        length = 0
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b""):
                break
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        await self.reader.readexactly(length)
        return int(status_line.split()[1])

    def close(self) -> None:
        self.writer.close()


async def closed_loop(port: int, reqs: list[bytes], conns: int, duration: float) -> dict:
    lat: list[float] = []
    codes: dict[int, int] = {}
    end = time.perf_counter() + duration

    async def worker(k: int) -> None:
        c = await Conn(port).open()
        i = k
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            code = await c.post(reqs[i % len(reqs)])
            lat.append(time.perf_counter() - t0)
            codes[code] = codes.get(code, 0) + 1
            i += conns
        c.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(k) for k in range(conns)))
    return _summary(lat, codes, time.perf_counter() - t0)


async def open_loop(port: int, reqs: list[bytes], rate: float, duration: float, conns: int = 64) -> dict:
    """Requests scheduled at a fixed rate; latency counts from the scheduled send time."""
    lat: list[float] = []
    codes: dict[int, int] = {}
    pool: asyncio.Queue = asyncio.Queue()
    for _ in range(conns):
        pool.put_nowait(await Conn(port).open())
    n = max(1, int(rate * duration))
    start = time.perf_counter() + 0.05

    async def one(i: int) -> None:
        when = start + i / rate
        await asyncio.sleep(max(0.0, when - time.perf_counter()))
        c = await pool.get()
        code = await c.post(reqs[i % len(reqs)])
        lat.append(time.perf_counter() - when)
        codes[code] = codes.get(code, 0) + 1
        pool.put_nowait(c)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    elapsed = time.perf_counter() - t0
    while not pool.empty():
        pool.get_nowait().close()
    return _summary(lat, codes, elapsed)


def cpu_seconds(pid: int, tid: int | None = None) -> float:
    """User + system CPU seconds of a process, or of one of its threads (Linux /proc), so a phase
    can report what the server itself burned per request, apart from the load generator."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    try:
        fields = Path(path).read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measured(pid: int, phase) -> dict:
    """Run one load phase and add CPU per request: the whole server, its event-loop thread (the
    main thread: HTTP, parsing, features, encoding, batching) and the load generator."""
    s0, l0, g0 = cpu_seconds(pid), cpu_seconds(pid, pid), time.process_time()
    s = asyncio.run(phase)
    s1, l1, g1 = cpu_seconds(pid), cpu_seconds(pid, pid), time.process_time()
    n = max(1, s["requests"])
    s["server_cpu_ms_per_req"] = (s1 - s0) / n * 1000
    s["event_loop_cpu_ms_per_req"] = (l1 - l0) / n * 1000
    s["loadgen_cpu_ms_per_req"] = (g1 - g0) / n * 1000
    return s


def _summary(lat: list[float], codes: dict[int, int], elapsed: float) -> dict:
    a = np.array(lat) * 1000 if lat else np.array([np.nan])
    ok = codes.get(200, 0)
    return {"requests": len(lat), "ok": ok, "non_200": len(lat) - ok, "req_per_s": ok / elapsed, "p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99))}


# ---------------------------------------------------------------- server
def start_server(repo: Path, model: str | None, redis_url: str, prefix: str, port: int, batching: bool, threads: int, config: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "ctr.cli", "--log-level", "WARNING", "serve", "--repo", str(repo), "--redis", redis_url,
           "--prefix", prefix, "--port", str(port), "--intra-op-threads", str(threads), "--config", str(config)]
    if model:  # None: the variants of the config file
        cmd += ["--model", model]
    if not batching:
        cmd.append("--no-batching")
    proc = subprocess.Popen(cmd, cwd=ROOT)
    import httpx

    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.3)
    stop_server(proc)
    raise RuntimeError("server did not become ready")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@contextlib.contextmanager
def serving(repo: Path, model: str | None, redis_url: str, prefix: str, batching: bool, threads: int, config: Path) -> Iterator[tuple[subprocess.Popen, int]]:
    """One `ctr serve` subprocess on a free loopback port for the length of a phase group."""
    from tests.testing import free_port

    port = free_port()
    proc = start_server(repo, model, redis_url, prefix, port, batching, threads, config)
    try:
        yield proc, port
    finally:
        stop_server(proc)


def open_loop_phase(proc: subprocess.Popen, port: int, reqs: list[bytes], rate: float, duration: float, label: str) -> dict:
    """Latency at a fixed offered rate (open loop), with the server's CPU over the same window."""
    s = measured(proc.pid, open_loop(port, reqs, rate, duration))
    print(f"{label} ({rate:,.0f} req/s, 100 cand): p50 {s['p50_ms']:.1f} ms  p99 {s['p99_ms']:.1f} ms  non-200 {s['non_200']}", flush=True)
    return s


# ---------------------------------------------------------------- in-process measurements
def raw_ort(onnx_path: Path, spec, threads: int, sizes: list[int], seconds: float) -> dict[int, float]:
    from service.scorer import Scorer

    scorer = Scorer(onnx_path, ["CPUExecutionProvider"], threads, 1, sizes)
    rng = np.random.default_rng(0)
    out = {}
    for b in sizes:
        tokens = np.stack([rng.integers(3, v, b) for v in spec.vocab_sizes], axis=1).astype(np.int64)
        scorer.score(tokens)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            scorer.score(tokens)
            n += 1
        out[b] = n * b / (time.perf_counter() - t0)
    return out


def overhead(spec, reqs: list[bytes], redis_url: str, prefix: str, fast: bool = True) -> dict[str, float]:
    """CPU ms per request outside the model, by stage (thread CPU time, not wall time).

    Steady state: one pass over the bodies first fills the item cache and the encoder's
    memo, as minutes of traffic would; then a second pass is measured. `fast=False` measures
    the plain column-by-column encoding (the tests' parity oracle) for comparison.
    """
    from service.encoding import FieldPlan, Missing, RequestEncoder
    from service.features import RedisFeatureStore
    from service.schemas import parse_request
    from tests.encoding_oracle import encode as plain_encode

    enc = RequestEncoder.for_spec(spec)

    def encode(req, f, ids):
        feats = [it.features for it in req.items]
        if fast:
            return enc.encode_request(req.user_id, f.user, f.items, ids, feats, req.context, Missing())
        return plain_encode(spec, req.user_id, f.user, f.items, ids, feats, req.context, Missing())

    async def run() -> dict[str, float]:
        store = RedisFeatureStore(redis_url, prefix, timeout_s=1.0, cache_items=10_000)
        store.use_fields(FieldPlan.for_spec(spec))
        acc = {"parse": 0.0, "fetch": 0.0, "encode": 0.0, "respond": 0.0}
        for i in range(2 * len(reqs)):
            c0 = time.thread_time()
            req = parse_request(reqs[i % len(reqs)], 10_000)
            ids = [it.item_id for it in req.items]
            c1 = time.thread_time()
            f = await store.fetch(req.user_id, ids)
            c2 = time.thread_time()
            tokens = encode(req, f, ids)
            c3 = time.thread_time()
            orjson.dumps({"request_id": "x", "model": "m", "version": 1, "variant": "main", "scores": np.full(len(tokens), 0.5, np.float32).astype(np.float64).tolist(), "degraded": False})
            c4 = time.thread_time()
            if i >= len(reqs):
                for k, v in zip(acc, (c1 - c0, c2 - c1, c3 - c2, c4 - c3)):
                    acc[k] += v
        await store.close()
        return {k: v / len(reqs) * 1000 for k, v in acc.items()}

    return asyncio.run(run())


def test_time_phases(repo: Path, name: str, version: int, tt: dict, args, prefix: str, serve_cfg: dict, work: Path, r100: list[bytes]) -> dict:
    """MATT on vs off: one server, variants `plain` and `matt` of one version, same requests."""
    pkg = repo / name / str(version)
    if not (pkg / "test_time_stats.npz").is_file():
        out = subprocess.run([sys.executable, "-m", "ctr.cli", "stats", "build", "--package", str(pkg), "--data", str(FRAPPE)],
                             cwd=ROOT, capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"ctr stats build failed: {out.stderr[-2000:]}")
    cfg = work / "serve-test-time.json"
    cfg.write_text(json.dumps({**serve_cfg, "variants": [{"name": "plain", "model": name, "version": version},
                                                         {"name": "matt", "model": name, "version": version, "test_time": tt}]}))
    reqs = {v: [orjson.dumps({**orjson.loads(b), "variant": v}) for b in r100] for v in ("plain", "matt")}
    res: dict = {"test_time": tt}
    with serving(repo, None, args.redis, prefix, True, args.threads, cfg) as (proc, port):
        for v in ("plain", "matt"):
            asyncio.run(closed_loop(port, reqs[v], args.conns, 1.0))  # warm connections and caches
            s = res[f"{v}_sat_100"] = measured(proc.pid, closed_loop(port, reqs[v], args.conns, args.duration))
            s["rows_per_s"] = s["req_per_s"] * 100
            print(f"{v:5s} saturation 100 cand: {s['rows_per_s']:>10,.0f} rows/s  p50 {s['p50_ms']:.1f} ms  p99 {s['p99_ms']:.1f} ms"
                  f"  non-200 {s['non_200']}  server CPU/req {s['server_cpu_ms_per_req']:.2f} ms", flush=True)
        rate = res["plain_sat_100"]["req_per_s"] * 0.5 or 1.0
        for v in ("plain", "matt"):
            res[f"{v}_load50_100"] = open_loop_phase(proc, port, reqs[v], rate, args.duration, f"{v:5s} at 50% of plain's saturation")
        import httpx

        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    from tests.service_support import metric_value

    rows = metric_value(text, "ctr_test_time_rows_total", variant="matt")
    res["share_with_paths"] = metric_value(text, "ctr_test_time_rows_with_paths_total", variant="matt") / rows if rows else None
    res["model_rows_per_row"] = 1 + metric_value(text, "ctr_test_time_extra_rows_total", variant="matt") / rows if rows else None
    p, m = res["plain_load50_100"], res["matt_load50_100"]
    res["p99_ratio_at_50pct"] = m["p99_ms"] / p["p99_ms"] if p["p99_ms"] else None
    res["saturation_ratio"] = res["matt_sat_100"]["rows_per_s"] / (res["plain_sat_100"]["rows_per_s"] or 1.0)
    print(f"MATT {tt}: {res['share_with_paths']:.2f} of rows with paths, {res['model_rows_per_row']:.2f} model rows per row;"
          f" saturation rows/s matt/plain {res['saturation_ratio']:.2f}; p99 at 50% load matt/plain {res['p99_ratio_at_50pct']:.2f}", flush=True)
    return res


# ---------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    ap.add_argument("--models", help="model repository with trained Frappe packages")
    ap.add_argument("--model", action="append", default=[], help="package name(s) in --models (e.g. frappe_dgenctr, frappe_dnn)")
    ap.add_argument("--duration", type=float, default=6.0, help="seconds per phase")
    ap.add_argument("--conns", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads in the server")
    ap.add_argument("--max-batch-rows", type=int, default=1024)
    ap.add_argument("--max-queue-delay-ms", type=float, default=2.0)
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--overhead-only", action="store_true", help="only the in-process CPU cost per request")
    ap.add_argument("--switch-interval-ms", type=float, default=0.0, help="server's gil_switch_interval_ms (0: the service default)")
    ap.add_argument("--compare-gc", action="store_true", help="also run (d) batched with gc_freeze off, side by side")
    ap.add_argument("--test-time", metavar="JSON", help="MATT on vs off instead of (a)-(d): a variant's test_time settings, "
                    "e.g. '{\"paths\": 4, \"trigger\": \"all\"}' (statistics are built into the package if missing)")
    args = ap.parse_args()

    from model.logs import setup_logging
    from tests.testing import dnn_onnx, publish

    setup_logging("WARNING")
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    results: dict = {"machine": {"cpus": os.cpu_count()}, "models": {}}
    with tempfile.TemporaryDirectory(prefix="ctr-bench-") as tmp:
        work = Path(tmp)
        try:
            spec, users, items, ctx = frappe_setup(work, args.redis, prefix, 5000)
            repo = Path(args.models) if args.models else work / "models"
            names = args.model
            if not names and not args.overhead_only:
                dnn_onnx(spec, work / "dnn.onnx")
                publish(repo, "frappe_dnn_shape", 1, spec, work / "dnn.onnx", "dnn_shape_random")
                names = ["frappe_dnn_shape"]
            cfg, cfg_nogc = work / "serve.json", work / "serve-nogc.json"
            serve_cfg = {"batcher": {"max_batch_rows": args.max_batch_rows, "max_queue_delay_ms": args.max_queue_delay_ms, "max_queue_rows": 50_000},
                         "scorer": {"providers": ["CPUExecutionProvider"]}}
            if args.switch_interval_ms:
                serve_cfg["gil_switch_interval_ms"] = args.switch_interval_ms
            cfg.write_text(json.dumps(serve_cfg))
            cfg_nogc.write_text(json.dumps({**serve_cfg, "gc_freeze": False}))
            r100 = bodies(users, items, ctx, 100, 300, seed=1)
            r10 = bodies(users, items, ctx, 10, 300, seed=2)
            for fast in (False, True):
                oh = overhead(spec, r100, args.redis, prefix, fast=fast)
                label = "fast encoder (served)" if fast else "general encoder"
                results["overhead_ms_per_100_row_request" if fast else "overhead_general_encoder_ms"] = oh
                print(f"CPU per 100-candidate request outside the model, {label}: {sum(oh.values()):.3f} ms  " + "  ".join(f"{k}={v:.3f}" for k, v in oh.items()), flush=True)
            if args.overhead_only:
                names = []
            for name in names:
                from service.package import latest_version

                version = latest_version(repo, name)
                res = results["models"][name] = {}
                if args.test_time:
                    print(f"\n== {name} v{version}: MATT on vs off", flush=True)
                    res["test_time"] = test_time_phases(repo, name, version, json.loads(args.test_time), args, prefix, serve_cfg, work, r100)
                    continue
                res["raw_ort_rows_per_s"] = raw_ort(repo / name / str(version) / "model.onnx", spec, args.threads, [10, 100, 256, 512, 1024], min(args.duration, 2.0))
                print(f"\n== {name} v{version}\n(a) raw onnxruntime rows/s: " + ", ".join(f"b{b}={v:,.0f}" for b, v in res["raw_ort_rows_per_s"].items()), flush=True)
                for batching in (True, False):
                    tag = "batched" if batching else "unbatched"
                    with serving(repo, name, args.redis, prefix, batching, args.threads, cfg) as (proc, port):
                        for n_items, reqs in ((100, r100), (10, r10)):
                            asyncio.run(closed_loop(port, reqs, args.conns, 1.0))  # warm connections and caches
                            s = measured(proc.pid, closed_loop(port, reqs, args.conns, args.duration))
                            s["rows_per_s"] = s["req_per_s"] * n_items
                            s["rows_per_server_cpu_s"] = n_items / s["server_cpu_ms_per_req"] * 1000
                            res[f"{tag}_sat_{n_items}"] = s
                            print(f"{tag:9s} saturation {n_items:3d} cand: {s['rows_per_s']:>10,.0f} rows/s  p50 {s['p50_ms']:.1f} ms  p99 {s['p99_ms']:.1f} ms  non-200 {s['non_200']}"
                                  f"  | CPU/req: server {s['server_cpu_ms_per_req']:.2f} ms (event loop {s['event_loop_cpu_ms_per_req']:.2f}),"
                                  f" load generator {s['loadgen_cpu_ms_per_req']:.2f} ms"
                                  f"  -> {s['rows_per_server_cpu_s']:,.0f} rows per server CPU-second", flush=True)
                        # Both modes are offered the same rates (fractions of the batched saturation,
                        # measured first), so their latencies compare at equal load.
                        sat = res["batched_sat_100"]["req_per_s"] or 1.0
                        for frac in (0.5, 0.1):
                            res[f"{tag}_load{int(frac * 100)}_100"] = open_loop_phase(
                                proc, port, r100, sat * frac, args.duration, f"{tag:9s} {int(frac * 100):3d}% load")
                if args.compare_gc:
                    # The batched service again with the heap left to the collector, at the same
                    # 50%-load rate: what gc.freeze buys in the tail, measured side by side.
                    with serving(repo, name, args.redis, prefix, True, args.threads, cfg_nogc) as (proc, port):
                        asyncio.run(closed_loop(port, r100, args.conns, 1.0))
                        res["batched_load50_100_gc_unfrozen"] = open_loop_phase(
                            proc, port, r100, res["batched_sat_100"]["req_per_s"] * 0.5, args.duration, "batched    50% load, gc_freeze off")
                ceiling = max(res["raw_ort_rows_per_s"].values())
                res["ratio_b_to_a"] = res["batched_sat_100"]["rows_per_s"] / ceiling
                res["ratio_batched_to_unbatched_10"] = res["batched_sat_10"]["rows_per_s"] / res["unbatched_sat_10"]["rows_per_s"]
                # The same ratio per CPU-second: what the service reaches when it does not share
                # its cores with the load generator (one server process = one event loop + ORT).
                res["ratio_b_to_a_per_cpu"] = res["batched_sat_100"]["rows_per_server_cpu_s"] / ceiling
                print(f"(b)/(a) = {res['ratio_b_to_a']:.2f}   (b)/(a) per server CPU-second = {res['ratio_b_to_a_per_cpu']:.2f}"
                      f"   batched/unbatched at 10 cand = {res['ratio_batched_to_unbatched_10']:.2f}x", flush=True)
        finally:
            import redis

            client = redis.Redis.from_url(args.redis)
            keys = list(client.scan_iter(match=f"{prefix}:*", count=5000))
            for i in range(0, len(keys), 5000):
                client.delete(*keys[i : i + 5000])
            client.close()
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
