"""`ctr quickstart` end to end with tiny settings: the real CLI, real training, real uvicorn."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.testing import free_port
from tests.service_support import REPO_ROOT

TINY = ["--rows", "4000", "--users", "200", "--items", "100", "--epochs", "1", "--pretrain-epochs", "1"]


def _quickstart(*args: str, **kw) -> list[str]:
    return [sys.executable, "-m", "ctr", "quickstart", *args]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """One tiny pipeline run (data -> train -> export), shared by the tests below."""
    wd = tmp_path_factory.mktemp("qs") / "work"
    out = subprocess.run(_quickstart("--workdir", str(wd), "--no-serve", *TINY), cwd=REPO_ROOT, capture_output=True, text=True, timeout=480)
    assert out.returncode == 0, out.stderr[-3000:]
    return wd, json.loads(out.stdout)


def test_pipeline_publishes_a_verified_package(built):
    from export.package import verify_package

    wd, summary = built
    pkg = verify_package(summary["package"])
    assert pkg.name == "quickstart" and pkg.model_type == "dgenctr"
    assert 0.0 < summary["test_auc"] <= 1.0 and 0.5 < summary["bayes_auc"] <= 1.0
    body = summary["example_request"]
    assert body["user_id"].startswith("u") and all(it["item_id"].startswith("i") for it in body["items"])
    state = json.loads((wd / "quickstart.json").read_text())
    assert set(state["steps"]) == {"data", "train", "export"}


def test_refuses_a_foreign_nonempty_workdir(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    out = subprocess.run(_quickstart("--workdir", str(tmp_path), "--no-serve", *TINY), cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "not made by `ctr quickstart`" in out.stderr
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_serve_answers_then_drains_on_sigterm(built):
    wd, summary = built
    port = free_port()
    proc = subprocess.Popen(
        _quickstart("--workdir", str(wd), "--port", str(port), "--reuse", *TINY),
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    # Read both pipes as they fill: the test waits for the printed curl (quickstart's own
    # "ready"), not only for the service's /readyz, which a direct probe can see first.
    out: dict[str, list[str]] = {"stdout": [], "stderr": []}
    readers = [threading.Thread(target=lambda k=k, f=f: out[k].extend(iter(f.readline, "")), daemon=True)
               for k, f in (("stdout", proc.stdout), ("stderr", proc.stderr))]
    for t in readers:
        t.start()
    try:
        deadline = time.monotonic() + 240
        ready = False
        while time.monotonic() < deadline and proc.poll() is None:
            if any("curl -s http://localhost:" in line for line in list(out["stdout"])):
                try:
                    ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200
                except httpx.HTTPError:
                    ready = False
                if ready:
                    break
            time.sleep(0.3)
        assert ready, "quickstart never became ready"
        r = httpx.post(f"http://127.0.0.1:{port}/score", json=summary["example_request"], timeout=10)
        assert r.status_code == 200
        scores = r.json()["scores"]
        assert len(scores) == len(summary["example_request"]["items"]) and all(0.0 < s < 1.0 for s in scores)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for t in readers:
            t.join(timeout=10)
    stdout, stderr = "".join(out["stdout"]), "".join(out["stderr"])
    assert proc.returncode == 0, stderr[-3000:]
    assert "curl -s http://localhost:" in stdout and summary["example_request"]["user_id"] in stdout
    assert "reuse step=train" in stderr  # a re-run says what it did not rebuild
    assert "drain_start" in stderr
    # A local demo has no load balancer to leave: it stops accepting at once, then drains.
    assert "grace_s=0" in stderr and "grace_s=5" not in stderr
