"""benchmarks/peers.py end to end: real `ctr serve` and peer servers under real load, real Redis.

The quick mode runs one scenario per server on the tiny trained package, here with 100 items
and 4 connections for 1 s: concurrent enough that batches form, light enough that a shared,
busy test machine does not push ctr-serve's queue past its 1 s timeout (a 503 by design). What is checked is what the table must hold, not speed: every server answered every
request (0 non-2xx, 0 transport errors), returned the offline scores to 1e-5, the ratio and the
markdown table were written, and the benchmark's Redis keys are gone afterwards. The heavy
peers run only where their extra (or PyTriton's virtualenv) is installed.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.service_support import trained_package  # noqa: F401  (fixture)

REPO = Path(__file__).resolve().parent.parent
PEERS_PY = REPO / "benchmarks" / "peers.py"

pytestmark = pytest.mark.slow


def run_peers(tmp_path: Path, package: Path, data: Path, redis_url: str, servers: str, *extra: str) -> tuple[dict, str]:
    out = tmp_path / "peers.json"
    cmd = [sys.executable, str(PEERS_PY), "--quick", "--scenarios", "100x4", "--servers", servers, "--package", str(package), "--data", str(data),
           "--redis", redis_url, "--duration", "1", "--warmup", "0.5", "--bodies", "40", "--out", str(out), *extra]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads(out.read_text()), out.with_suffix(".md").read_text()


def assert_clean(rows: list[dict]) -> None:
    for r in rows:
        assert "skipped" not in r, r
        assert r["requests"] > 0 and r["ok"] == r["requests"], r
        assert r["non_2xx"] == 0 and r["errors"] == 0, r
        assert r["parity_max_abs_diff"] <= 1e-5, r
        assert r["rows_per_s"] > 0 and r["server_cpu_ms_per_req"] > 0 and r["model_cpu_ms_per_req"] > 0, r


def assert_redis_clean(redis_url: str, prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        assert not list(client.scan_iter(match=f"{prefix}-*", count=1000))
    finally:
        client.close()


@pytest.mark.parametrize("loadgen", ["wrk", "asyncio"])
def test_quick_ctr_serve_and_naive_peer(tmp_path, trained_package, synth_dir, redis_url, loadgen):  # noqa: F811
    if loadgen == "wrk" and not shutil.which("wrk"):
        pytest.skip("wrk is not installed (apt-get install -y wrk)")
    result, table = run_peers(tmp_path, trained_package, synth_dir, redis_url, "ctr-serve,naive", "--loadgen", loadgen)
    rows = result["results"]
    assert [(r["server"], r["items"], r["conns"]) for r in rows] == [("ctr-serve", 100, 4), ("naive", 100, 4)]
    assert_clean(rows)
    assert rows[0]["input"] == "raw + Redis" and rows[1]["input"] == "tokens"
    assert rows[1]["ctr_serve_ratio"] == pytest.approx(rows[0]["rows_per_s"] / rows[1]["rows_per_s"])
    assert result["meta"]["loadgen"] == loadgen
    lines = [line for line in table.splitlines() if line.startswith("| synth |")]
    assert len(lines) == 3  # one per server, then the summary row (ctr-serve against the best peer)
    assert "| ctr-serve | raw + Redis |" in lines[0] and "| naive | tokens |" in lines[1]
    assert "| 0 / 0 |" in lines[0] and "| 0 / 0 |" in lines[1]
    assert lines[2].startswith("| synth | 100 | 4 |") and "| naive |" in lines[2]
    assert_redis_clean(redis_url, result["meta"]["redis_prefix"])


def _installed(peer: str) -> bool:
    from benchmarks.peer_servers import PEERS

    p = PEERS[peer]
    if p.venv:
        python = REPO / p.venv / "bin" / "python"
        return python.exists() and subprocess.run([str(python), "-c", f"import {p.extra}"], capture_output=True).returncode == 0
    return importlib.util.find_spec(p.extra.split(".")[0]) is not None


@pytest.mark.parametrize("peer", ["pytriton", "litserve", "ray-serve"])
def test_quick_heavy_peer(tmp_path, trained_package, synth_dir, redis_url, peer):  # noqa: F811
    if peer == "litserve":
        pytest.importorskip("litserve")
    elif peer == "ray-serve":
        pytest.importorskip("ray.serve")
    elif not _installed(peer):
        pytest.skip("PyTriton's virtualenv .venv-pytriton is not set up (see benchmarks/peer_servers/__init__.py)")
    result, table = run_peers(tmp_path, trained_package, synth_dir, redis_url, peer)
    rows = result["results"]
    assert [r["server"] for r in rows] == [peer]
    assert_clean(rows)
    assert f"| {peer} |" in table


def test_scenarios_and_ratios():
    sys.path.insert(0, str(REPO))
    from benchmarks.peers import Scenario, add_ratios, markdown, outside_model

    assert [(s.items, s.conns) for s in Scenario.parse("10x16, 500x32")] == [(10, 16), (500, 32)]
    base = {"model": "m", "items": 10, "conns": 16, "p50_ms": 1.0, "p99_ms": 2.0, "non_2xx": 0, "errors": 0, "server_cpu_ms_per_req": 1.0,
            "outside_model_cpu_ms_per_req": 0.75}
    rows = [{**base, "server": "ctr-serve", "rows_per_s": 300.0}, {**base, "server": "naive", "rows_per_s": 200.0},
            {"model": "m", "items": 10, "conns": 16, "server": "ray-serve", "skipped": "failed: x"}]
    add_ratios(rows)
    assert "ctr_serve_ratio" not in rows[0] and rows[1]["ctr_serve_ratio"] == pytest.approx(1.5)
    table = markdown(rows)
    assert "| 1.50 |" in table and "| 1.00 (0.75) |" in table and "failed: x" in table
    # Only answered requests ran the model: 100 requests, 40 refused, 2 ms CPU each on average.
    assert outside_model({"requests": 100, "ok": 60, "server_cpu_ms_per_req": 2.0, "model_cpu_ms_per_req": 1.5}) == pytest.approx((200 - 90) / 100)
