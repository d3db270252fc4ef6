"""ctr-serve against the servers a user would pick instead, on the same model and the same cores.

    python benchmarks/peers.py [--quick] [--scenarios 10x16,100x32] [--servers ctr-serve,naive,...]
                               [--package MODELS/NAME/VERSION ... --data DIR] [--out peers.json]

One exported `model.onnx` (the DNN and the DGenCTR package, trained here in about a minute on
Frappe_x1 when it is present, else on synthetic data; or given with --package) is served by:

* ctr-serve as a user runs it: `ctr serve` with its defaults, features bulk-loaded into Redis
  with `ctr features load` under a fresh key prefix (deleted at the end), raw requests
  (user id, context, item ids), so the feature fetch and the encoding are in every request;
* the peers of benchmarks/peer_servers/ (a naive FastAPI script, PyTriton, LitServe, Ray
  Serve; `pip install '.[peers]'`), sent pre-encoded int64 tokens, as a user of a generic
  model server would send them: they do less work per request than ctr-serve.

Every server runs onnxruntime on the CPU provider with one intra-op thread and every graph
optimisation (ctr-serve: `--intra-op-threads 1 --providers CPUExecutionProvider`; the peers:
peer_servers/ort_session.py), and every batcher gets ctr-serve's 1024-row cap and 2 ms delay.
Before timing, each server must return ctr-serve's scores for the same rows to 1e-5.

One load generator drives them all: wrk with one thread (closed loop, N keep-alive
connections, a Lua script that posts pre-built bodies and prints the percentiles in its
`done` hook). Where wrk is not installed, an asyncio generator takes its place, and its CPU
per request is printed next to the server's to show it is not the bottleneck. Servers and
the load generator are left unpinned by default, the same for every server (a 2-core machine
has no core to spare for pinning; wrk's one thread costs well under a tenth of the server's
CPU per request, printed with each run); on a larger machine give them disjoint cores with
--server-cpus and --loadgen-cpus. Server CPU per request is the utime + stime of the server's whole
process tree from /proc over the timed window, divided by the requests.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import orjson
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.peer_servers import PEERS, Peer  # noqa: E402
from benchmarks.serving import FRAPPE, _summary, cpu_seconds, start_server, stop_server  # noqa: E402

CTR = "ctr-serve"
TOLERANCE = 1e-5
FULL_SCENARIOS = "10x16,10x32,100x16,100x32,500x16,500x32"
QUICK_SCENARIOS = "100x16"
WRK_LUA = r"""
local threads, reqs, i = {}, {}, 0
statuses, first_error = {}, ""
setup = function(thread)
  table.insert(threads, thread)
end
init = function(args)
  for line in io.lines(os.getenv("PEERS_BODIES")) do
    reqs[#reqs + 1] = wrk.format("POST", os.getenv("PEERS_PATH"), {["Content-Type"] = "application/json"}, line)
  end
end
request = function()
  i = i % #reqs + 1
  return reqs[i]
end
response = function(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
  if status ~= 200 and first_error == "" then first_error = string.sub(body, 1, 200) end
end
done = function(summary, latency, requests)
  local e = summary.errors
  local codes = {}
  local sample = ""
  for _, t in ipairs(threads) do
    for code, n in pairs(t:get("statuses")) do codes[#codes + 1] = string.format('"%d": %d', code, n) end
    if sample == "" then sample = t:get("first_error") end
  end
  io.write(string.format('PEERS_RESULT {"requests": %d, "duration_us": %d, "connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d, "p50_us": %d, "p99_us": %d, "codes": {%s}}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout, latency:percentile(50), latency:percentile(99), table.concat(codes, ", ")))
  io.write("PEERS_FIRST_ERROR " .. string.gsub(sample, "\n", " ") .. "\n")
end
"""


# ---------------------------------------------------------------- packages
@dataclass(frozen=True)
class Package:
    label: str  # "dnn", "dgenctr", or the folder name of a --package
    path: Path  # MODELS/NAME/VERSION

    @property
    def onnx(self) -> Path:
        return self.path / "model.onnx"


def ctr_cli(*argv: str, timeout: float = 1800) -> str:
    """Run one `ctr` command as a user would; its stdout, or a clear failure."""
    out = subprocess.run([sys.executable, "-m", "ctr", "--log-level", "WARNING", *argv], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"ctr {' '.join(argv[:2])} failed: {out.stderr[-2000:]}")
    return out.stdout


# The reference architectures of docs/results.md; few rows and one epoch, because the serving
# cost depends on the network's shape, not on how well it was trained.
TRAIN_ARGS = {
    "dnn": ["--model", "dnn", "--embedding-dim", "10", "--hidden", "400,400,400"],
    "dgenctr": ["--model", "dgenctr", "--d-model", "32", "--layers", "2", "--pretrain-epochs", "1"],
}


def build_packages(data: Path, spec_name: str, work: Path, labels: list[str], rows: int) -> list[Package]:
    out = []
    for label in labels:
        run = work / f"run-{label}"
        t0 = time.perf_counter()
        ctr_cli("train", "--spec", spec_name, "--data", str(data), "--out", str(run), *TRAIN_ARGS[label],
                "--epochs", "1", "--max-rows", str(rows), "--threads", "1", "--no-progress")
        ctr_cli("export", "--run", str(run), "--repo", str(work / "models"), "--name", f"peers_{label}")
        out.append(Package(label, work / "models" / f"peers_{label}" / "1"))
        print(f"built {label} package in {time.perf_counter() - t0:.0f} s: {out[-1].path}", flush=True)
    return out


# ---------------------------------------------------------------- workload
@dataclass
class Workload:
    """Users, items and contexts of one dataset, and the spec of the package being served."""

    spec: object  # model.spec.FeatureSpec
    users: pd.DataFrame
    items: pd.DataFrame
    contexts: pd.DataFrame
    user_col: str
    item_col: str

    @classmethod
    def from_data(cls, data: Path, package: Path) -> "Workload":
        from model.readers import read_table, split_path
        from model.spec import FeatureSpec
        spec = FeatureSpec.load(package / "feature_spec.json")
        train = read_table(split_path(data, "train"))
        tables = {}
        for entity in ("user", "item"):
            fields = spec.fields_from(entity)
            col = id_field(entity, fields)
            stored = next((data / f"{entity}s.{ext}" for ext in ("parquet", "csv") if (data / f"{entity}s.{ext}").exists()), None)
            # Frappe has no side tables: the rows of the training split hold each entity's fields.
            table = read_table(stored) if stored else train[[f for f in fields if f in train.columns]].drop_duplicates(col)
            tables[entity] = (table.reset_index(drop=True), col)
        contexts = train[spec.fields_from("context")].drop_duplicates().reset_index(drop=True)
        return cls(spec, tables["user"][0], tables["item"][0], contexts, tables["user"][1], tables["item"][1])

    def write_tables(self, work: Path) -> dict[str, Path]:
        paths = {"user": work / "users.parquet", "item": work / "items.parquet"}
        self.users.to_parquet(paths["user"], index=False)
        self.items.to_parquet(paths["item"], index=False)
        return paths

    def requests(self, n_items: int, count: int, seed: int) -> tuple[list[dict], list[np.ndarray]]:
        """`count` raw requests for ctr-serve and, for the same rows, the tokens the spec makes
        of them offline (tables joined into one frame and encoded, as at training time)."""
        rng = np.random.default_rng(seed)
        bodies, frames = [], []
        for k in range(count):
            user = self.users.iloc[int(rng.integers(len(self.users)))]
            ctx = self.contexts.iloc[int(rng.integers(len(self.contexts)))]
            items = self.items.iloc[rng.choice(len(self.items), n_items, replace=n_items > len(self.items))]
            bodies.append({
                "user_id": _scalar(user[self.user_col]),
                "context": {c: _scalar(v) for c, v in ctx.items()},
                "items": [{"item_id": _scalar(x)} for x in items[self.item_col]],
            })
            frame = items.reset_index(drop=True).copy()
            for c, v in user.items():
                frame[c] = v
            for c, v in ctx.items():
                frame[c] = v
            frame["_req"] = k
            frames.append(frame)
        rows = pd.concat(frames, ignore_index=True)
        tokens = self.spec.encode(rows, strict=False)
        return bodies, [tokens[rows["_req"].to_numpy() == k] for k in range(count)]


def id_field(entity: str, fields: list[str]) -> str:
    """The column holding the entity's id: `user_id` (synthetic) or plain `user` (Frappe), as
    the service reads it."""
    return next(f for f in (f"{entity}_id", entity) if f in fields)


def _scalar(v):
    return v.item() if isinstance(v, np.generic) else v


def peer_body(peer: Peer | None, raw: dict, tokens: np.ndarray) -> bytes:
    if peer is None:
        return orjson.dumps(raw)
    if peer.body == "kserve":
        return orjson.dumps({"inputs": [{"name": "tokens", "shape": list(tokens.shape), "datatype": "INT64", "data": tokens.ravel().tolist()}]})
    return orjson.dumps({"tokens": tokens.tolist()})


def scores_of(peer: Peer | None, payload: bytes) -> np.ndarray:
    body = orjson.loads(payload)
    if peer is not None and peer.body == "kserve":
        return np.asarray(body["outputs"][0]["data"], dtype=np.float64).ravel()
    return np.asarray(body["scores"], dtype=np.float64)


# ---------------------------------------------------------------- processes
def tree_pids(root: int) -> list[int]:
    """`root` and every live descendant (Ray, Triton and LitServe work in child processes)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            ppid = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def tree_cpu(root: int) -> dict[int, float]:
    return {pid: cpu_seconds(pid) for pid in tree_pids(root)}


def cpu_between(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU burned in the window; a process that started inside it counts from zero."""
    return sum(v - before.get(pid, 0.0) for pid, v in after.items() if v == v)


def free_port(span: int = 1) -> int:
    """A loopback port with `span` free ports from it (PyTriton takes port, port+1, port+2)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port + span < 65535 and all(_free(port + k) for k in range(1, span)):
            return port
    raise RuntimeError("no free port range")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def start_time(pid: int) -> int | None:
    """A process's start time in clock ticks: with its pid, an identity that survives pid reuse."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


@dataclass
class Server:
    name: str
    peer: Peer | None
    proc: subprocess.Popen
    port: int
    started_s: float
    # (pid, start time) of every process seen in the server's tree, so that one a runtime
    # reparented away (Ray's) is still stopped, and a reused pid never is.
    seen: set[tuple[int, int | None]] = field(default_factory=set)

    def remember(self, pids) -> None:
        self.seen |= {(pid, start_time(pid)) for pid in pids}

    @property
    def path(self) -> str:
        return self.peer.path if self.peer else "/score"


def interpreter(peer: Peer) -> str:
    """The Python a peer runs on: its own virtualenv's where it has one, else this one."""
    return str(ROOT / peer.venv / "bin" / "python") if peer.venv else sys.executable


def launch_peer(peer: Peer, onnx: Path, items: int, log: Path) -> Server:
    port = free_port(3)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    cmd = [interpreter(peer), "-m", peer.module, "--model", str(onnx), "--port", str(port), "--max-batch-rows", "1024",
           "--max-delay-ms", "2", "--items", str(items)]
    t0 = time.perf_counter()
    with open(log, "ab") as fh:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    return Server(peer.name, peer, proc, port, t0)


def launch_ctr(package: Path, redis_url: str, prefix: str, work: Path, threads: int = 1) -> Server:
    """`ctr serve` with its defaults, but for the onnxruntime settings every server shares
    (`threads` 0: the service's own intra-op default instead)."""
    cfg = work / "ctr-serve.json"
    cfg.write_text(json.dumps({"scorer": {"providers": ["CPUExecutionProvider"]}}))
    port = free_port()
    t0 = time.perf_counter()
    proc = start_server(package.parent.parent, package.parent.name, redis_url, prefix, port, True, threads, cfg)
    return Server(CTR, None, proc, port, t0)


def wait_ready(server: Server, probe: bytes, timeout_s: float = 300.0) -> None:
    """Ready when a real scoring request answers 200 (each server has its own health route)."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"{server.name} exited with {server.proc.returncode} before it was ready")
        try:
            r = httpx.post(f"http://127.0.0.1:{server.port}{server.path}", content=probe, headers={"Content-Type": "application/json"}, timeout=10)
            if r.status_code == 200:
                server.started_s = time.perf_counter() - server.started_s
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{server.name} not ready after {timeout_s:.0f} s")


def stop(server: Server) -> None:
    """SIGTERM, then SIGKILL to whatever of the server's own process tree is left."""
    server.remember(tree_pids(server.proc.pid))
    if server.peer is None:
        stop_server(server.proc)
    else:
        with contextlib.suppress(ProcessLookupError):
            server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(60)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait(10)
    for pid, started in server.seen:
        if started is not None and start_time(pid) == started:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


# ---------------------------------------------------------------- load generation
def cpu_list(text: str) -> set[int]:
    """"0-3,6" -> {0, 1, 2, 3, 6}"""
    out: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.strip().partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


LOADGEN_CPUS: set[int] | None = None  # --loadgen-cpus: where wrk runs (None: wherever the OS puts it)


def run_wrk(server: Server, bodies_file: Path, conns: int, seconds: float, lua: Path) -> dict:
    env = {**os.environ, "PEERS_BODIES": str(bodies_file), "PEERS_PATH": server.path}
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    pin = ["taskset", "-c", ",".join(map(str, sorted(LOADGEN_CPUS)))] if LOADGEN_CPUS else []
    cmd = [*pin, "wrk", "-t1", f"-c{conns}", f"-d{max(1, round(seconds))}s", "--timeout", "10s", "-s", str(lua), f"http://127.0.0.1:{server.port}"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=seconds + 60)
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    m = re.search(r"^PEERS_RESULT (\{.*\})$", out.stdout, re.M)
    if not m:
        raise RuntimeError(f"wrk printed no result: {out.stdout[-1500:]} {out.stderr[-1500:]}")
    r = json.loads(m.group(1))
    n = r["requests"]
    errors = r["connect"] + r["read"] + r["write"] + r["timeout"]
    ok = sum(v for k, v in r["codes"].items() if k.startswith("2"))
    first = re.search(r"^PEERS_FIRST_ERROR (.*)$", out.stdout, re.M)
    return {"requests": n, "ok": ok, "non_2xx": sum(r["codes"].values()) - ok, "errors": errors, "status_codes": r["codes"],
            "first_error_body": first.group(1).strip() if first else "", "seconds": r["duration_us"] / 1e6,
            "p50_ms": r["p50_us"] / 1000, "p99_ms": r["p99_us"] / 1000,
            "loadgen_cpu_s": (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)}


async def _asyncio_load(port: int, path: str, bodies: list[bytes], conns: int, seconds: float) -> dict:
    """The fallback generator: N keep-alive HTTP/1.1 connections, each in a closed loop."""
    lat: list[float] = []
    codes: dict[int, int] = {}
    errors = 0
    end = time.perf_counter() + seconds

    async def worker(k: int) -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        i = k
        while time.perf_counter() < end:
            body = bodies[i % len(bodies)]
            t0 = time.perf_counter()
            writer.write(b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (path.encode(), len(body), body))
            try:
                status = int((await reader.readline()).split()[1])
                length = 0
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    if line[:15].lower() == b"content-length:":
                        length = int(line[15:])
                await reader.readexactly(length)
            except (OSError, IndexError, ValueError, asyncio.IncompleteReadError):
                errors += 1
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                continue
            lat.append(time.perf_counter() - t0)
            codes[status] = codes.get(status, 0) + 1
            i += conns
        writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(k) for k in range(conns)))
    return {**_summary(lat, codes, time.perf_counter() - t0), "errors": errors, "seconds": time.perf_counter() - t0}


def run_asyncio(server: Server, bodies: list[bytes], conns: int, seconds: float) -> dict:
    c0 = time.process_time()
    s = asyncio.run(_asyncio_load(server.port, server.path, bodies, conns, seconds))
    non_2xx = s["requests"] - s["ok"]
    return {"requests": s["requests"] + s["errors"], "ok": s["ok"], "non_2xx": non_2xx, "errors": s["errors"], "seconds": s["seconds"],
            "p50_ms": s["p50_ms"], "p99_ms": s["p99_ms"], "loadgen_cpu_s": time.process_time() - c0}


# ---------------------------------------------------------------- one server, one scenario
@dataclass
class Scenario:
    items: int
    conns: int

    @classmethod
    def parse(cls, text: str) -> list["Scenario"]:
        out = []
        for part in text.split(","):
            items, _, conns = part.strip().partition("x")
            out.append(cls(int(items), int(conns)))
        return out


def measure(server: Server, sc: Scenario, bodies: list[bytes], bodies_file: Path, lua: Path, seconds: float, warmup: float, loadgen: str) -> dict:
    use_wrk = loadgen == "wrk"
    if warmup > 0:
        run_wrk(server, bodies_file, sc.conns, warmup, lua) if use_wrk else run_asyncio(server, bodies, sc.conns, warmup)
    before = tree_cpu(server.proc.pid)
    s = run_wrk(server, bodies_file, sc.conns, seconds, lua) if use_wrk else run_asyncio(server, bodies, sc.conns, seconds)
    after = tree_cpu(server.proc.pid)
    server.remember(after)
    n = max(1, s["requests"])
    s.update(
        loadgen="wrk -t1" if use_wrk else "asyncio",
        rows_per_s=s["ok"] * sc.items / s["seconds"],
        server_cpu_ms_per_req=cpu_between(before, after) / n * 1000,
        loadgen_cpu_ms_per_req=s.pop("loadgen_cpu_s") / n * 1000,
        server_processes=len(after),
    )
    return s


def check_parity(server: Server, raws: list[dict], tokens: list[np.ndarray], references: list[list[np.ndarray]]) -> tuple[float, list[np.ndarray]]:
    """Largest |score - reference| over the probe requests and every reference given (1.0 when
    a request fails), and the scores the server returned."""
    import httpx

    worst, scores = 0.0, []
    with httpx.Client(base_url=f"http://127.0.0.1:{server.port}", timeout=30) as client:
        for k, (raw, tok) in enumerate(zip(raws, tokens)):
            r = client.post(server.path, content=peer_body(server.peer, raw, tok), headers={"Content-Type": "application/json"})
            if r.status_code != 200:
                return 1.0, scores
            got = scores_of(server.peer, r.content)
            scores.append(got)
            for ref in references:
                worst = max(worst, float(np.max(np.abs(got - ref[k]))) if got.shape == ref[k].shape else 1.0)
    return worst, scores


# ---------------------------------------------------------------- the run
def available(names: list[str]) -> list[str]:
    out = []
    for name in names:
        peer = PEERS.get(name)
        if name != CTR and peer is None:
            raise SystemExit(f"unknown server {name!r}: choose from {[CTR, *PEERS]}")
        if peer and peer.venv:
            python = interpreter(peer)
            found = Path(python).exists() and subprocess.run([python, "-c", f"import {peer.extra}"], capture_output=True).returncode == 0
            if not found:
                print(f"skipping {name}: no {peer.venv} with `{peer.extra}` (see benchmarks/peer_servers/__init__.py)", flush=True)
                continue
        elif peer and peer.extra and importlib.util.find_spec(peer.extra.split(".")[0]) is None:
            print(f"skipping {name}: `{peer.extra}` is not installed (pip install '.[peers]')", flush=True)
            continue
        out.append(name)
    return out


def model_cpu_ms(onnx: Path, tokens: list[np.ndarray], count: int = 50) -> float:
    """The model's share of a request: CPU ms of one Session.run on one request's rows (thread
    CPU time, median over `count` requests, same session settings). Subtracted from a server's
    CPU per request it leaves what the server spends outside the model; batching servers run
    bigger batches, a little cheaper per row, so that remainder is a slight underestimate."""
    from benchmarks.peer_servers.ort_session import score, session

    sess = session(str(onnx))
    score(sess, tokens[0])
    times = []
    for tok in tokens[:count]:
        c0 = time.thread_time()
        score(sess, tok)
        times.append(time.thread_time() - c0)
    return float(np.median(times)) * 1000


def reference_scores(onnx: Path, tokens: list[np.ndarray]) -> list[np.ndarray]:
    from benchmarks.peer_servers.ort_session import score, session

    sess = session(str(onnx))
    return [score(sess, t).astype(np.float64) for t in tokens]


def bench_package(pkg: Package, wl: Workload, servers: list[str], scenarios: list[Scenario], args, work: Path, prefix: str, lua: Path) -> list[dict]:
    sizes = sorted({sc.items for sc in scenarios})
    reqs = {n: wl.requests(n, args.bodies, seed=n) for n in sizes}
    model_ms = {n: model_cpu_ms(pkg.onnx, reqs[n][1]) for n in sizes}
    print(f"[{pkg.label}] Session.run CPU per request: " + ", ".join(f"{n} items {model_ms[n]:.3f} ms" for n in sizes), flush=True)
    probe_raw, probe_tok = reqs[sizes[0]][0][: args.parity_requests], reqs[sizes[0]][1][: args.parity_requests]
    # Every server is held to the offline path (the tables joined and encoded by the spec, then
    # a session of the same settings), and each peer also to what ctr-serve returned.
    references = [reference_scores(pkg.onnx, probe_tok)]
    results: list[dict] = []
    for name in servers:
        peer = PEERS.get(name)
        files: dict[int, tuple[list[bytes], Path]] = {}
        for n in sizes:
            bodies = [peer_body(peer, raw, tok) for raw, tok in zip(*reqs[n])]
            f = work / f"bodies-{pkg.label}-{name}-{n}.jsonl"
            f.write_bytes(b"\n".join(bodies) + b"\n")
            files[n] = (bodies, f)
        # Batchers that count requests get one launch per request size, with the same row cap.
        groups = [sizes] if peer is None or peer.batch_unit != "requests" else [[n] for n in sizes]
        for group in groups:
            log = work / f"{name}.log"
            server = None
            try:
                server = launch_ctr(pkg.path, args.redis, prefix, work, args.ctr_intra_op_threads) if peer is None else launch_peer(peer, pkg.onnx, group[0], log)
                wait_ready(server, peer_body(peer, probe_raw[0], probe_tok[0]))
                diff, scores = check_parity(server, probe_raw, probe_tok, references)
                if peer is None and diff <= TOLERANCE:
                    references.append(scores)
                against = "offline" + (" and ctr-serve" if peer is not None and len(references) > 1 else "")
                print(f"[{pkg.label}] {name}: ready in {server.started_s:.1f} s, max |score - {against}| = {diff:.2e}", flush=True)
                for sc in (s for s in scenarios if s.items in group):
                    row = {"model": pkg.label, "server": name, "items": sc.items, "conns": sc.conns, "parity_max_abs_diff": diff,
                           "batching": peer.batching if peer else "ctr-serve batcher (rows)", "input": "tokens" if peer else "raw + Redis"}
                    if diff > TOLERANCE:
                        row["skipped"] = f"scores differ from the offline scorer by {diff:.2e} (> {TOLERANCE})"
                        print(f"  {sc.items}x{sc.conns}: NOT TIMED: {row['skipped']}", flush=True)
                    else:
                        row.update(measure(server, sc, *files[sc.items], lua, args.duration, args.warmup, args.loadgen))
                        row["model_cpu_ms_per_req"] = model_ms[sc.items]
                        row["outside_model_cpu_ms_per_req"] = outside_model(row)
                        print(f"  {sc.items:3d} items x {sc.conns:2d} conns: {row['rows_per_s']:>9,.0f} rows/s  p50 {row['p50_ms']:6.1f} ms"
                              f"  p99 {row['p99_ms']:6.1f} ms  non-2xx {row['non_2xx']}  errors {row['errors']}"
                              f"  server CPU {row['server_cpu_ms_per_req']:.2f} ms/req ({row['server_processes']} processes)"
                              f"  {row['loadgen']} CPU {row['loadgen_cpu_ms_per_req']:.3f} ms/req", flush=True)
                    results.append(row)
            except Exception as exc:  # one server failing must not lose the others' figures
                tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
                print(f"[{pkg.label}] {name}: FAILED: {exc}\n{tail}", flush=True)
                for sc in (s for s in scenarios if s.items in group):
                    results.append({"model": pkg.label, "server": name, "items": sc.items, "conns": sc.conns, "skipped": f"failed: {exc}"})
            finally:
                if server is not None:
                    stop(server)
    return results


def outside_model(row: dict) -> float:
    """Server CPU per request less the model's share, which only answered requests paid (a
    request refused with 503 never reached Session.run)."""
    n = max(1, row["requests"])
    return (row["server_cpu_ms_per_req"] * n - row["ok"] * row["model_cpu_ms_per_req"]) / n


def add_ratios(results: list[dict]) -> None:
    ctr = {(r["model"], r["items"], r["conns"]): r for r in results if r["server"] == CTR and "rows_per_s" in r}
    for r in results:
        base = ctr.get((r["model"], r["items"], r["conns"]))
        if base and "rows_per_s" in r and r["server"] != CTR and r["rows_per_s"] > 0:
            r["ctr_serve_ratio"] = base["rows_per_s"] / r["rows_per_s"]


def markdown(results: list[dict]) -> str:
    lines = ["| model | items | conns | server | input | rows/s | p50 ms | p99 ms | non-2xx / errors | server CPU ms/req (outside the model) | ctr-serve ÷ peer |",
             "|---|---:|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        head = f"| {r['model']} | {r['items']} | {r['conns']} | {r['server']} | {r.get('input', '')} "
        if "rows_per_s" not in r:
            lines.append(head + f"| {r.get('skipped', 'not run')} | | | | | |")
            continue
        ratio = f"{r['ctr_serve_ratio']:.2f}" if "ctr_serve_ratio" in r else ""
        lines.append(head + f"| {r['rows_per_s']:,.0f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['non_2xx']} / {r['errors']} "
                     f"| {r['server_cpu_ms_per_req']:.2f} ({r['outside_model_cpu_ms_per_req']:.2f}) | {ratio} |")
    return "\n".join(lines) + "\n"


def summary_markdown(results: list[dict]) -> str:
    """Per scenario: ctr-serve against the fastest peer that ran, throughput and tail."""
    lines = ["| model | items | conns | ctr-serve rows/s | best peer | its rows/s | ctr-serve ÷ best peer | p99 ctr-serve / peer ms |",
             "|---|---:|---:|---:|---|---:|---:|---:|"]
    keys = sorted({(r["model"], r["items"], r["conns"]) for r in results}, key=lambda k: (k[0], k[1], k[2]))
    for key in keys:
        rows = [r for r in results if (r["model"], r["items"], r["conns"]) == key and "rows_per_s" in r]
        ctr = next((r for r in rows if r["server"] == CTR), None)
        peers = [r for r in rows if r["server"] != CTR]
        if ctr is None or not peers:
            continue
        best = max(peers, key=lambda r: r["rows_per_s"])
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {ctr['rows_per_s']:,.0f} | {best['server']} | {best['rows_per_s']:,.0f} "
                     f"| {ctr['rows_per_s'] / best['rows_per_s']:.2f} | {ctr['p99_ms']:.0f} / {best['p99_ms']:.0f} |")
    return "\n".join(lines) + "\n" if len(lines) > 2 else ""


def tables(results: list[dict]) -> str:
    add_ratios(results)
    summary = summary_markdown(results)
    return markdown(results) + ("\n" + summary if summary else "")


def render(path: Path) -> int:
    data = json.loads(path.read_text())
    for r in data["results"]:
        if "rows_per_s" in r:
            r["outside_model_cpu_ms_per_req"] = outside_model(r)
    text = tables(data["results"])
    path.with_suffix(".md").write_text(text)
    print(text + f"\n{data['meta']['command']}: {len(data['results'])} runs in {data['meta']['seconds'] / 60:.1f} min")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help=f"one model, {QUICK_SCENARIOS} (items x connections), 2 s runs: a smoke test")
    ap.add_argument("--scenarios", help=f"items x connections, comma-separated (default {FULL_SCENARIOS})")
    ap.add_argument("--servers", default=",".join([CTR, *PEERS]), help="comma-separated; peers whose extra is missing are skipped")
    ap.add_argument("--package", action="append", default=[], help="an exported package folder (MODELS/NAME/VERSION) instead of training; repeatable")
    ap.add_argument("--data", help="the dataset the packages were trained on (default: Frappe_x1 if present, else synthetic data made here)")
    ap.add_argument("--models", default="dnn,dgenctr", help="which packages to train when no --package is given")
    ap.add_argument("--train-rows", type=int, default=20_000, help="rows of each split the quick training run reads")
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    ap.add_argument("--duration", type=float, help="seconds per timed run (default 5; --quick 2)")
    ap.add_argument("--warmup", type=float, help="seconds of load before each timed run (default 1)")
    ap.add_argument("--bodies", type=int, default=200, help="distinct requests per size, cycled by the load generator")
    ap.add_argument("--parity-requests", type=int, default=4, help="requests checked against the offline scores before timing")
    ap.add_argument("--ctr-intra-op-threads", type=int, default=1,
                    help="ctr-serve's onnxruntime intra-op threads per worker (default 1, as every peer; 0: the service's own default)")
    ap.add_argument("--server-cpus", help="pin every server (and this script) to these CPUs, e.g. 0-5 (default: unpinned)")
    ap.add_argument("--loadgen-cpus", help="pin wrk to these CPUs, e.g. 6-7 (default: unpinned)")
    ap.add_argument("--loadgen", choices=["auto", "wrk", "asyncio"], default="auto", help="auto: wrk where installed, else asyncio")
    ap.add_argument("--render", metavar="JSON", help="only print (and write next to it) the tables of an earlier run's JSON")
    ap.add_argument("--out", default="peers.json", help="JSON results (the markdown table goes next to it as .md)")
    args = ap.parse_args(argv)
    if args.render:
        return render(Path(args.render))
    args.duration = args.duration or (2.0 if args.quick else 5.0)
    args.warmup = 1.0 if args.warmup is None else args.warmup
    scenarios = Scenario.parse(args.scenarios or (QUICK_SCENARIOS if args.quick else FULL_SCENARIOS))
    servers = available([s.strip() for s in args.servers.split(",") if s.strip()])
    global LOADGEN_CPUS
    if args.server_cpus:
        os.sched_setaffinity(0, cpu_list(args.server_cpus))  # the servers are started from here and inherit it
    if args.loadgen_cpus:
        LOADGEN_CPUS = cpu_list(args.loadgen_cpus)
    if args.loadgen == "auto":
        args.loadgen = "wrk" if shutil.which("wrk") else "asyncio"
    elif args.loadgen == "wrk" and not shutil.which("wrk"):
        raise SystemExit("wrk is not installed (apt-get install -y wrk)")

    from model.logs import setup_logging

    setup_logging("WARNING")
    t_start = time.perf_counter()
    prefix = f"peers-{uuid.uuid4().hex[:10]}"
    results: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="ctr-peers-") as tmp:
        work = Path(tmp)
        lua = work / "post.lua"
        lua.write_text(WRK_LUA)
        try:
            if args.data:
                data = Path(args.data)
            elif FRAPPE.joinpath("train.csv").exists():
                data = FRAPPE
            else:
                data = work / "synth"
                ctr_cli("data", "synth", "--out", str(data), "--rows", "30000", "--users", "1000", "--items", "600", "--seed", "11")
            if args.package:
                packages = [Package(Path(p).parent.name, Path(p)) for p in args.package]
            else:
                spec_name = "frappe_x1" if data == FRAPPE else "synthetic"
                labels = [m.strip() for m in args.models.split(",") if m.strip()]
                packages = build_packages(data, spec_name, work, labels[:1] if args.quick else labels, args.train_rows)
            for pkg in packages:
                wl = Workload.from_data(data, pkg.path)
                pkg_prefix = f"{prefix}-{pkg.label}"
                for entity, table in wl.write_tables(work).items():
                    ctr_cli("features", "load", "--table", str(table), "--entity", entity, "--redis", args.redis, "--prefix", pkg_prefix)
                results += bench_package(pkg, wl, servers, scenarios, args, work, pkg_prefix, lua)
        finally:
            import redis

            client = redis.Redis.from_url(args.redis)
            keys = list(client.scan_iter(match=f"{prefix}-*", count=5000))
            for i in range(0, len(keys), 5000):
                client.delete(*keys[i : i + 5000])
            client.close()
    elapsed = time.perf_counter() - t_start
    table = tables(results)
    print("\n" + table + f"\n{len(results)} runs in {elapsed / 60:.1f} min", flush=True)
    out = Path(args.out)
    meta = {"command": " ".join(["python", "benchmarks/peers.py", *(argv if argv is not None else sys.argv[1:])]), "cpus": os.cpu_count(),
            "loadgen": args.loadgen, "ctr_intra_op_threads": args.ctr_intra_op_threads, "server_cpus": args.server_cpus or "unpinned", "loadgen_cpus": args.loadgen_cpus or "unpinned",
            "redis_prefix": prefix, "seconds": elapsed, "duration_s": args.duration,
            "scenarios": [asdict(s) for s in scenarios], "servers": servers, "data": str(data)}
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    out.with_suffix(".md").write_text(table)
    bad = [r for r in results if "rows_per_s" not in r or r["non_2xx"] or r["errors"]]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
