"""`ctr serve --workers N`: rows/s, latency and memory per worker count and intra-op threads.

    python benchmarks/workers.py [--redis redis://127.0.0.1:6379/0] [--setups 1x1,2x1,2x2] [--duration 8]

Each setup `WxT` is `ctr serve --workers W --intra-op-threads T` serving a DNN-shaped Frappe
model (10 fields, emb 10, 400-400-400, random weights; the compute of the reference DNN)
with its features in Redis under a fresh prefix (or, with --embedded, in each worker's
in-process store, which takes a shared Redis out of the measurement), driven by wrk (OS package) on loopback with
16 keep-alive connections and 100-item requests rotated over 200 bodies. It prints rows/s,
p50/p99, non-2xx, server CPU per request (the parent and all its workers, from /proc), and
the memory of the parent and each worker after the run: RSS and PSS (/proc/PID/smaps_rollup;
PSS divides shared pages among the processes sharing them, so PSS adds up and RSS does not).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.serving import bodies, cpu_seconds, frappe_setup  # noqa: E402

LUA = """
local bodies = {}
for line in io.lines("%s") do bodies[#bodies + 1] = line end
local i = 0
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
request = function()
  i = i %% #bodies + 1
  return wrk.format(nil, "/score", nil, bodies[i])
end
"""


def children(pid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def memory_kb(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("Rss", "Pss"):
            out[key.lower()] = int(rest.split()[0])
    return out


def wrk(port: int, lua: Path, conns: int, duration: float) -> dict:
    cmd = ["wrk", "-t1", f"-c{conns}", f"-d{duration:.0f}s", "--latency", "-s", str(lua), f"http://127.0.0.1:{port}"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    res = {"requests": int(re.search(r"(\d+) requests in", out).group(1)), "req_per_s": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))}
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    res["non_2xx"] = int(non2xx.group(1)) if non2xx else 0
    errors = re.search(r"Socket errors: (.*)", out)
    res["socket_errors"] = errors.group(1) if errors else ""

    def ms(label: str) -> float:
        m = re.search(rf"\s{label}\s+([\d.]+)(us|ms|s)\b", out)
        value, unit = float(m.group(1)), m.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    res["p50_ms"], res["p99_ms"] = ms("50%"), ms("99%")
    return res


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_setup(repo: Path, model: str, redis_url: str, prefix: str, workers: int, threads: int, cfg: Path, lua: Path, args) -> dict:
    port = free_port()
    store = ["--users", str(repo.parent / "users.parquet"), "--items", str(repo.parent / "items.parquet")] if args.embedded else ["--redis", redis_url, "--prefix", prefix]
    cmd = [sys.executable, "-m", "ctr.cli", "--log-level", "WARNING", "serve", "--repo", str(repo), "--model", model, *store,
           "--port", str(port), "--workers", str(workers), "--intra-op-threads", str(threads), "--config", str(cfg), "--drain-grace-s", "0"]
    proc = subprocess.Popen(cmd, cwd=ROOT)
    import httpx

    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200 and (workers == 1 or len(children(proc.pid)) >= workers):
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.3)
        time.sleep(2.0)  # every worker warm
        wrk(port, lua, args.conns, 2)  # warm connections and caches
        pids = [proc.pid, *children(proc.pid)]
        c0 = sum(cpu_seconds(p) for p in pids)
        res = wrk(port, lua, args.conns, args.duration)
        c1 = sum(cpu_seconds(p) for p in pids)
        res["rows_per_s"] = res["req_per_s"] * (1 - res["non_2xx"] / max(1, res["requests"])) * 100  # answered 200 only
        res["server_cpu_ms_per_req"] = (c1 - c0) / max(1, res["requests"]) * 1000
        res["memory_kb"] = {("parent" if p == proc.pid and workers > 1 else f"worker{i - (workers > 1)}"): memory_kb(p) for i, p in enumerate(pids)}
        return res
    finally:
        proc.terminate()
        proc.wait(60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    ap.add_argument("--setups", default="1x1,2x1,2x2", help="comma-separated WORKERSxTHREADS")
    ap.add_argument("--duration", type=float, default=8.0)
    ap.add_argument("--conns", type=int, default=16)
    ap.add_argument("--embedded", action="store_true", help="features from the in-process store instead of Redis (takes Redis out of the measurement)")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("wrk not found: apt-get install wrk")

    import redis

    from model.logs import setup_logging
    from tests.testing import dnn_onnx, publish

    setup_logging("WARNING")
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    results: dict = {"machine": {"cpus": os.cpu_count()}, "runs": []}
    with tempfile.TemporaryDirectory(prefix="ctr-bench-workers-") as tmp:
        work = Path(tmp)
        try:
            spec, users, items, ctx = frappe_setup(work, args.redis, prefix, 5000)
            dnn_onnx(spec, work / "dnn.onnx")
            publish(work / "models", "frappe_dnn_shape", 1, spec, work / "dnn.onnx", "dnn_shape_random")
            (work / "bodies.jsonl").write_bytes(b"\n".join(bodies(users, items, ctx, 100, 200, seed=1)) + b"\n")
            lua = work / "score.lua"
            lua.write_text(LUA % (work / "bodies.jsonl"))
            cfg = work / "serve.json"
            cfg.write_text(json.dumps({"batcher": {"max_queue_rows": 50_000}, "scorer": {"providers": ["CPUExecutionProvider"]}}))
            for setup in args.setups.split(","):
                w, t = (int(x) for x in setup.lower().split("x"))
                r = run_setup(work / "models", "frappe_dnn_shape", args.redis, prefix, w, t, cfg, lua, args)
                results["runs"].append({"setup": setup, **r})
                mem = "  ".join(f"{k} rss {v['rss'] / 1024:.0f} MiB pss {v['pss'] / 1024:.0f} MiB" for k, v in r["memory_kb"].items())
                print(f"workers {w} x intra-op {t}: {r['rows_per_s']:>9,.0f} rows/s  p50 {r['p50_ms']:.1f} ms  p99 {r['p99_ms']:.1f} ms  "
                      f"non-2xx {r['non_2xx']}  server CPU/req {r['server_cpu_ms_per_req']:.2f} ms  | {mem}", flush=True)
        finally:
            client = redis.Redis.from_url(args.redis)
            keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
            for i in range(0, len(keys), 1000):
                client.delete(*keys[i:i + 1000])
    print("\nmedian of the runs of each setup (setups repeated in --setups are interleaved runs):")
    for setup in dict.fromkeys(r["setup"] for r in results["runs"]):
        runs = [r for r in results["runs"] if r["setup"] == setup]
        med = {k: float(np.median([r[k] for r in runs])) for k in ("rows_per_s", "p50_ms", "p99_ms", "server_cpu_ms_per_req")}
        print(f"  {setup}: {med['rows_per_s']:>9,.0f} rows/s  p50 {med['p50_ms']:.1f} ms  p99 {med['p99_ms']:.1f} ms  "
              f"server CPU/req {med['server_cpu_ms_per_req']:.2f} ms  ({len(runs)} runs: " + ", ".join(f"{r['rows_per_s']:,.0f}" for r in runs) + ")")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
