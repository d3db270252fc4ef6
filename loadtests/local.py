"""A throwaway local stack on loopback: ctr-serve (real uvicorn, `ctr serve`) and Prometheus.

Used to try the locustfile, the alert rules and the dashboard's queries on one machine
without Docker, and by the test suite for the same purpose. Every process is started with
a deadline and stopped (SIGTERM, then SIGKILL) when its context exits.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (urllib.error.URLError, OSError):
        return 0, b""


def wait_for(url: str, proc: subprocess.Popen, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before {url} answered")
        if http_get(url)[0] == 200:
            return
        time.sleep(0.2)
    raise TimeoutError(f"{what}: {url} did not answer 200 within {timeout_s:.0f}s")


def stop(proc: subprocess.Popen, grace_s: float = 15.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def ctr_executable() -> list[str]:
    """`ctr` from the running interpreter's environment (works in any venv)."""
    exe = Path(sys.executable).with_name("ctr")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "ctr"]


@contextlib.contextmanager
def running_service(
    repo: Path,
    config: dict[str, Any],
    workdir: Path,
    redis_url: str | None = None,
    prefix: str | None = None,
    users: Path | None = None,
    items: Path | None = None,
    start_timeout_s: float = 90.0,
    admin_token: str = "local-test-token",
) -> Iterator[str]:
    """`ctr serve` on 127.0.0.1:<free port>; yields its base URL once /readyz is 200."""
    port = free_port()
    cfg_path = workdir / f"serve-{port}.json"
    cfg_path.write_text(json.dumps(config), encoding="utf-8")
    cmd = [*ctr_executable(), "serve", "--repo", str(repo), "--config", str(cfg_path), "--host", "127.0.0.1", "--port", str(port)]
    if redis_url:
        cmd += ["--redis", redis_url]
    if prefix:
        cmd += ["--prefix", prefix]
    if users and items:
        cmd += ["--users", str(users), "--items", str(items)]
    log = open(workdir / f"serve-{port}.log", "wb")
    env = dict(os.environ, CTR_ADMIN_TOKEN=admin_token)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_for(f"{url}/readyz", proc, start_timeout_s, "ctr serve")
        except (RuntimeError, TimeoutError) as exc:
            log.flush()
            raise RuntimeError(f"{exc}\n--- serve log ---\n{(workdir / f'serve-{port}.log').read_text(errors='replace')[-4000:]}") from None
        yield url
    finally:
        stop(proc)
        log.close()


# ------------------------------------------------------------------------------ Prometheus


def find_or_install_prometheus(timeout_s: float = 420.0) -> tuple[str, str] | str:
    """(prometheus, promtool) paths, installing Debian's `prometheus` package if needed.

    Returns a string saying why not when neither is found nor installable (no apt-get, not
    root, or the install failed). A file lock keeps parallel test processes from running
    apt-get twice.
    """

    def found() -> tuple[str, str] | None:
        prom, tool = shutil.which("prometheus"), shutil.which("promtool")
        return (prom, tool) if prom and tool else None

    if hit := found():
        return hit
    if not shutil.which("apt-get"):
        return "prometheus/promtool not on PATH and no apt-get to install the Debian package"
    if os.geteuid() != 0:
        return "prometheus/promtool not on PATH and not root: run `apt-get install prometheus`"
    lock_path = Path(tempfile.gettempdir()) / "ctr-serve-apt-prometheus.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if hit := found():
            return hit
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        deadline = time.monotonic() + timeout_s
        for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "prometheus"]):
            left = deadline - time.monotonic()
            try:
                r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=max(1.0, left))
            except subprocess.TimeoutExpired:
                return f"`{' '.join(cmd)}` did not finish within {timeout_s:.0f}s"
            if r.returncode != 0:
                return f"`{' '.join(cmd)}` failed: {r.stderr.strip()[-300:]}"
    return found() or "apt-get installed prometheus but the binaries are not on PATH"


def prometheus_config(target: str, rules: Path, scrape_s: float = 1.0, device: str = "cpu") -> str:
    return json.dumps(
        {
            "global": {"scrape_interval": f"{scrape_s:g}s", "evaluation_interval": f"{scrape_s:g}s"},
            "rule_files": [str(rules)],
            "scrape_configs": [
                {"job_name": "ctr-serve", "static_configs": [{"targets": [target], "labels": {"device": device}}]}
            ],
        }
    )


@contextlib.contextmanager
def running_prometheus(prometheus: str, target: str, workdir: Path, rules: Path | None = None, start_timeout_s: float = 60.0) -> Iterator[str]:
    """A real Prometheus scraping `target` every second with the project's rules loaded."""
    port = free_port()
    cfg = workdir / f"prometheus-{port}.yml"
    cfg.write_text(prometheus_config(target, rules or DEPLOY / "prometheus" / "rules.yml"), encoding="utf-8")
    log = open(workdir / f"prometheus-{port}.log", "wb")
    cmd = [
        prometheus,
        f"--config.file={cfg}",
        f"--storage.tsdb.path={workdir / f'tsdb-{port}'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--storage.tsdb.retention.time=1h",
        "--log.level=warn",
    ]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(f"{url}/-/ready", proc, start_timeout_s, "prometheus")
        yield url
    finally:
        stop(proc)
        log.close()


def prom_query(base: str, expr: str, at: float | None = None) -> list[dict[str, Any]]:
    params = {"query": expr}
    if at is not None:
        params["time"] = f"{at:.3f}"
    status, body = http_get(f"{base}/api/v1/query?{urllib.parse.urlencode(params)}", timeout=10)
    data = json.loads(body or b"{}")
    if status != 200 or data.get("status") != "success":
        raise RuntimeError(f"query failed ({status}): {expr}\n{data.get('error', body[:300])}")
    return data["data"]["result"]


def prom_json(base: str, path: str) -> dict[str, Any]:
    status, body = http_get(f"{base}{path}", timeout=10)
    if status != 200:
        raise RuntimeError(f"GET {path} -> {status}")
    return json.loads(body)["data"]
