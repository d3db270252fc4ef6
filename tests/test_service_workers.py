"""`ctr serve --workers N`: real worker processes on one port, real Redis, real onnxruntime.

Which worker answered a connection is read from /proc (the server-side socket of the
client's port belongs to exactly one worker's file table), so the tests see the kernel's
own account, not something the service reports about itself.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.ab import Assigner
from service.features import bulk_load
from tests.testing import tiny_package
from tests.redis_servers import free_port
from tests.service_support import REPO_ROOT, metric_value, request_body

AUTH = {"Authorization": "Bearer tok"}


# ------------------------------------------------------------------------------ helpers
class Served:
    """A `ctr serve --workers N` subprocess with its run directory."""

    def __init__(self, proc: subprocess.Popen, port: int, run_dir: Path, log: Path) -> None:
        self.proc, self.port, self.run_dir, self.log = proc, port, run_dir, log
        self.url = f"http://127.0.0.1:{port}"

    def worker_pids(self) -> set[int]:
        try:
            kids = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        except OSError:
            return set()
        return {int(k) for k in kids}

    def ready_pids(self) -> set[int]:
        ready = self.run_dir / "ready"
        return ({int(p.name) for p in ready.iterdir()} if ready.is_dir() else set()) & self.worker_pids()

    def wait_ready(self, workers: int, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while len(self.ready_pids()) < workers:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            assert time.monotonic() < deadline, "workers not ready in time"
            time.sleep(0.1)

    def owner(self, client_port: int) -> int | None:
        """The worker whose file table holds the server side of this client connection."""
        inodes = set()
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            for line in Path(table).read_text().splitlines()[1:]:
                parts = line.split()
                local, remote = parts[1], parts[2]
                if int(local.rsplit(":", 1)[1], 16) == self.port and int(remote.rsplit(":", 1)[1], 16) == client_port:
                    inodes.add(f"socket:[{parts[9]}]")
        for pid in self.worker_pids():
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                        return pid
                except OSError:
                    continue
        return None

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)


def start(tmp: Path, repo: Path, redis_url: str, prefix: str, workers: int = 2, grace: float = 0.0, extra: dict | None = None) -> Served:
    cfg = {
        "scorer": {"providers": ["CPUExecutionProvider"], "buckets": [1, 16, 128, 512], "warmup_runs": 1},
        "batcher": {"max_batch_rows": 512, "max_queue_delay_ms": 2},
        **(extra or {}),
    }
    cfg_path = tmp / f"serve-{time.monotonic_ns()}.json"
    cfg_path.write_text(json.dumps(cfg))
    port = free_port()
    run_dir = tmp / f"run-{port}"
    log = tmp / f"serve-{port}.log"
    cmd = [sys.executable, "-m", "ctr.cli", "serve", "--repo", str(repo), "--config", str(cfg_path), "--port", str(port),
           "--redis", redis_url, "--prefix", prefix, "--workers", str(workers), "--drain-grace-s", str(grace), "--run-dir", str(run_dir)]
    env = {**os.environ, "CTR_ADMIN_TOKEN": "tok"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
    served = Served(proc, port, run_dir, log)
    try:
        served.wait_ready(workers)
    except BaseException:
        served.stop()
        raise
    return served


def held_connections(served: Served, n: int, method: str = "GET", path: str = "/healthz", body: Any = None) -> list[tuple[http.client.HTTPConnection, int, Any]]:
    """n keep-alive connections opened together, one request each, left open: (conn, worker pid, reply)."""
    conns = [http.client.HTTPConnection("127.0.0.1", served.port, timeout=30) for _ in range(n)]
    out = []
    for c in conns:
        c.connect()
    for c in conns:
        data = json.dumps(body).encode() if body is not None else None
        c.request(method, path, body=data, headers={"Content-Type": "application/json"} if data else {})
        r = c.getresponse()
        payload = json.loads(r.read())
        assert r.status == 200, payload
        out.append((c, served.owner(c.sock.getsockname()[1]), payload))
    return out


def connections_per_worker(served: Served, workers: int, method: str = "GET", path: str = "/healthz", body: Any = None, tries: int = 10) -> dict[int, Any]:
    """One reply from each worker (connections are opened until every worker accepted one)."""
    seen: dict[int, Any] = {}
    opened = []
    try:
        for _ in range(tries):
            for c, pid, payload in held_connections(served, 8, method, path, body):
                opened.append(c)
                assert pid is not None
                seen.setdefault(pid, payload)
            if len(seen) >= workers:
                return seen
    finally:
        for c in opened:
            c.close()
    raise AssertionError(f"only workers {sorted(seen)} accepted connections")


@pytest.fixture()
def loaded_redis(synth_dir: Path, redis_url: str, redis_prefix: str) -> tuple[str, str]:
    for entity in ("user", "item"):
        bulk_load(synth_dir / f"{entity}s.parquet", entity, redis_url, redis_prefix)
    return redis_url, redis_prefix


@pytest.fixture()
def repo(synth_spec, tmp_path: Path) -> Path:
    tiny_package(tmp_path / "models", "synth", 1, synth_spec, seed=1)
    return tmp_path / "models"


# ------------------------------------------------------------------------------ unit
def test_ctr_serve_defaults_match_the_docs(tmp_path):
    from ctr.cli import build_parser
    from service.cli import build_config
    from service.workers import default_workers, usable_cores

    args = build_parser().parse_args(["serve", "--repo", str(tmp_path)])
    assert build_config(args).drain_grace_s == 5.0
    assert "drain_grace_s: 5 " in (REPO_ROOT / "docs/service.md").read_text()
    assert "`drain_grace_s` (5 s" in (REPO_ROOT / "docs/operations.md").read_text()
    cfg_file = tmp_path / "c.json"
    cfg_file.write_text(json.dumps({"drain_grace_s": 1.5}))
    assert build_config(build_parser().parse_args(["serve", "--config", str(cfg_file)])).drain_grace_s == 1.5
    assert build_config(build_parser().parse_args(["serve", "--drain-grace-s", "0"])).drain_grace_s == 0.0
    assert 1 <= usable_cores() <= len(os.sched_getaffinity(0))
    assert 1 <= default_workers(["CPUExecutionProvider"]) <= 8


# ------------------------------------------------------------------------------ servers
@pytest.mark.slow
def test_a_worker_that_cannot_start_stops_the_server_instead_of_looping(tmp_path):
    (tmp_path / "models" / "synth").mkdir(parents=True)  # a model with no version
    log = tmp_path / "serve.log"
    cmd = [sys.executable, "-m", "ctr.cli", "serve", "--repo", str(tmp_path / "models"), "--model", "synth", "--port", str(free_port()),
           "--workers", "2", "--users", "x.parquet", "--items", "y.parquet", "--providers", "CPUExecutionProvider"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT)
    try:
        code = proc.wait(180)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert code != 0, text[-2000:]
    assert "worker_startup_failed" in text and text.count("worker_started") == 2  # no restarts



@pytest.mark.slow
def test_workers_share_one_port_assign_alike_and_metrics_add_up(synth_spec, synth_dir, tmp_path, loaded_redis):
    root = tmp_path / "models"
    tiny_package(root, "a", 1, synth_spec, seed=1)
    tiny_package(root, "b", 1, synth_spec, seed=2)
    variants = [{"name": "control", "model": "a", "weight": 1}, {"name": "treat", "model": "b", "weight": 1}]
    served = start(tmp_path, root, *loaded_redis, extra={"variants": variants, "ab_salt": "exp-w"})
    try:
        assigner = Assigner(["control", "treat"], [1, 1], "exp-w")
        sent = 0
        by_worker: dict[int, list[str]] = {}
        users = [request_body(synth_dir, 5, user_index=i, seed=i) for i in range(12)]
        for _ in range(3):  # each user scored on many connections, so on each worker
            for body in users:
                for c, pid, reply in held_connections(served, 4, "POST", "/score", body):
                    c.close()
                    sent += 1
                    assert reply["variant"] == assigner.assign(body["user_id"]), (pid, body["user_id"])
                    by_worker.setdefault(pid, []).append(body["user_id"])
        assert len(by_worker) == 2 and by_worker.keys() == served.worker_pids(), by_worker.keys()
        both = set.intersection(*(set(v) for v in by_worker.values()))
        assert len(both) >= 3  # the same users answered by both workers, with the same variant
        assert {assigner.assign(b["user_id"]) for b in users} == {"control", "treat"}

        # Any worker's /metrics shows every worker's requests.
        for _ in range(4):
            text = httpx.get(served.url + "/metrics").text
            assert metric_value(text, "ctr_request_seconds_count", status="200") == sent
            assert metric_value(text, "ctr_model_info", variant="control", version="1") == 1  # livemax, not a sum of 2
            assert "ctr_inflight_rows" in text
            assert 'pid="' not in text  # merged: the labels are those of one process
    finally:
        assert served.stop() == 0


@pytest.mark.slow
def test_killed_worker_is_restarted_and_counts_survive(repo, synth_dir, tmp_path, loaded_redis):
    served = start(tmp_path, repo, *loaded_redis)
    try:
        body = request_body(synth_dir, 8)
        for _ in range(10):
            assert httpx.post(served.url + "/score", json=body).status_code == 200
        before = served.worker_pids()
        victim = min(before)
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 120
        while not (len(served.ready_pids()) == 2 and victim not in served.worker_pids()):
            assert time.monotonic() < deadline and served.proc.poll() is None
            time.sleep(0.1)
        replacement = (served.worker_pids() - before).pop()
        replies = connections_per_worker(served, 2, "POST", "/score", body)
        assert set(replies) == served.worker_pids() and replacement in replies
        text = httpx.get(served.url + "/metrics").text
        # the dead worker's 10 requests are still counted (counters never go backwards)
        assert metric_value(text, "ctr_request_seconds_count", status="200") >= 10 + 2
        assert metric_value(text, "ctr_model_info", version="1") == 1
        assert "worker_died" in served.log.read_text()
    finally:
        assert served.stop() == 0


@pytest.mark.slow
def test_reload_reaches_every_worker_and_a_restarted_one(repo, synth_spec, synth_dir, tmp_path, loaded_redis):
    served = start(tmp_path, repo, *loaded_redis, extra={"batcher": {"max_batch_rows": 512, "max_queue_delay_ms": 2}})
    body = request_body(synth_dir, 8)

    def versions() -> dict[int, int]:
        return {pid: reply["models"][0]["version"] for pid, reply in connections_per_worker(served, 2, "GET", "/models").items()}

    def wait_versions(want: int) -> None:
        deadline = time.monotonic() + 60
        while set(versions().values()) != {want}:
            assert time.monotonic() < deadline, versions()
            time.sleep(0.2)

    try:
        assert set(versions().values()) == {1}
        tiny_package(repo, "synth", 2, synth_spec, seed=2)
        r = httpx.post(served.url + "/admin/reload", headers=AUTH, timeout=60)
        assert r.status_code == 200 and r.json()["results"][0]["version"] == 2
        wait_versions(2)
        text = httpx.get(served.url + "/metrics").text
        assert metric_value(text, "ctr_model_info", version="2") == 1 and metric_value(text, "ctr_model_info", version="1") == 0

        # Roll back to 1 (newest is 2); a worker restarted afterwards joins on 1, not on newest.
        r = httpx.post(served.url + "/admin/reload", headers=AUTH, json={"version": 1}, timeout=60)
        assert r.status_code == 200
        wait_versions(1)
        victim = min(served.worker_pids())
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 120
        while not (len(served.ready_pids()) == 2 and victim not in served.worker_pids()):
            assert time.monotonic() < deadline and served.proc.poll() is None
            time.sleep(0.1)
        assert set(versions().values()) == {1}
        replies = connections_per_worker(served, 2, "POST", "/score", body)
        assert {r["version"] for r in replies.values()} == {1}
    finally:
        assert served.stop() == 0


# ------------------------------------------------------------------------------ drain
@pytest.mark.slow
def test_drain_closes_idle_keepalive_connections_while_the_listener_still_accepts(repo, synth_dir, tmp_path, loaded_redis):
    """A pooled keep-alive connection is closed by the server early in the grace, so its
    client reconnects while the listener is open instead of racing the final close."""
    served = start(tmp_path, repo, *loaded_redis, grace=4.0)
    try:
        idle = held_connections(served, 6, "POST", "/score", request_body(synth_dir, 5))
        served.proc.send_signal(signal.SIGTERM)
        time.sleep(1.5)
        for c, _, _ in idle:
            c.sock.settimeout(5)
            assert c.sock.recv(1) == b""  # closed by the server: FIN, no stray bytes
        assert served.proc.poll() is None  # still in the grace
        r = httpx.post(served.url + "/score", json=request_body(synth_dir, 5), timeout=10)
        assert r.status_code == 200 and r.headers["connection"] == "close"
        assert httpx.get(served.url + "/readyz", timeout=10).status_code == 503
        assert served.proc.wait(60) == 0
        assert "drain_idle_closed" in served.log.read_text()
    finally:
        served.stop()


HEAD = b"POST /score HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"


async def drain_run(served: Served, bodies: list[bytes], lanes: int, sigterm_after: float) -> dict[str, Any]:
    """Keep-alive load from `lanes` connections; SIGTERM midway; every outcome classified.

    failed: a request on a connection that had already answered (a keep-alive reuse), a
    cut response, or any status but 200 and a 503 with Retry-After (admission control's
    answer): the server accepted the connection's traffic and lost it.
    not_accepted: a fresh connection closed with no byte of answer (it sat in the listen
    backlog, or was closed before its request was read, as the listener shut); refused:
    connect refused after the listener closed.
    """
    stats: dict[str, Any] = {"ok": 0, "shed": 0, "failed": [], "not_accepted": 0, "refused": 0, "closing_answers": 0, "ready_during_grace": None}
    done = asyncio.Event()

    async def lane(k: int) -> None:
        reader = writer = None
        answered = 0
        i = k
        while not done.is_set():
            if writer is None:
                try:
                    reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
                except OSError:
                    stats["refused"] += 1
                    await asyncio.sleep(0.01)
                    continue
                answered = 0
            body = bodies[i % len(bodies)]
            i += lanes
            got = b""
            try:
                writer.write(HEAD % len(body) + body)
                got = await reader.readline()
                if not got:
                    raise ConnectionResetError("closed before an answer")
                status = int(got.split()[1])
                length, close, retry_after = 0, False, False
                while True:
                    line = await reader.readline()
                    if line in (b"\r\n", b""):
                        break
                    name, _, value = line.decode().partition(":")
                    if name.lower() == "content-length":
                        length = int(value)
                    elif name.lower() == "connection" and "close" in value.lower():
                        close = True
                    elif name.lower() == "retry-after":
                        retry_after = True
                payload = await reader.readexactly(length)
            except (OSError, asyncio.IncompleteReadError) as exc:
                if answered == 0 and not got:
                    stats["not_accepted"] += 1
                else:
                    stats["failed"].append(f"{type(exc).__name__} after {answered} answers on the connection, got {got[:40]!r}")
                writer.close()
                reader = writer = None
                continue
            answered += 1
            if status == 200:
                stats["ok"] += 1
            elif status == 503 and retry_after:
                stats["shed"] += 1  # refused by admission control, with an answer: not lost
            else:
                stats["failed"].append(f"status {status}: {payload[:120]!r}")
            if close:
                stats["closing_answers"] += 1
                writer.close()
                reader = writer = None

    async def conduct() -> None:
        await asyncio.sleep(sigterm_after)
        served.proc.send_signal(signal.SIGTERM)
        # Probe until a worker says "draining" (readiness 503) or the listener is gone; a probe
        # whose connection is cut as the listener closes is one more unanswered fresh connection.
        async with httpx.AsyncClient() as c:
            while served.proc.poll() is None and stats["ready_during_grace"] != 503:
                try:
                    stats["ready_during_grace"] = (await c.get(served.url + "/readyz", timeout=5)).status_code
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.02)
        while served.proc.poll() is None:
            await asyncio.sleep(0.05)
        done.set()

    await asyncio.wait_for(asyncio.gather(conduct(), *(lane(k) for k in range(lanes))), timeout=120)
    return stats


def served_requests(metrics_dir: Path) -> float:
    """/score requests the service itself answered, from the workers' multiprocess files."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    reg = CollectorRegistry()
    MultiProcessCollector(reg, path=str(metrics_dir))
    return metric_value(generate_latest(reg).decode(), "ctr_request_seconds_count")


@pytest.mark.slow
def test_sigterm_drain_with_two_workers_loses_nothing(repo, synth_dir, tmp_path, loaded_redis):
    """10 SIGTERMs under keep-alive load: every request the service accepted is answered 200."""
    import orjson

    bodies = [orjson.dumps(request_body(synth_dir, 20, user_index=i % 40, seed=i)) for i in range(64)]
    runs = []
    for run in range(10):
        served = start(tmp_path, repo, *loaded_redis, grace=1.0)
        stats = asyncio.run(drain_run(served, bodies, lanes=16, sigterm_after=0.6))
        code = served.proc.wait(60)
        log = served.log.read_text()
        answered_by_service = served_requests(served.run_dir / "metrics")
        runs.append({k: (len(v) if isinstance(v, list) else v) for k, v in stats.items()} | {"served": answered_by_service, "code": code})
        assert code == 0, log[-3000:]
        assert stats["failed"] == [], stats["failed"]
        assert answered_by_service == stats["ok"] + stats["shed"]  # nothing the service answered was lost on the way
        assert stats["ready_during_grace"] == 503
        assert stats["closing_answers"] > 0  # draining answers said Connection: close
        assert "graceful shutdown exceeded" not in log
    print("drain runs:", json.dumps(runs))
    assert sum(r["ok"] for r in runs) > 10 * 50
