"""A fresh start with a bad repository: bad newest versions are skipped and counted, the newest
good one serves; with no good version the process exits non-zero with one line.

Packages are real (the exporter's writer, a real ONNX graph), damaged one way each, and the
service is started as users start it: `ctr serve` in a child process, under real uvicorn.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from model.readers import load_splits
from model.spec import FeatureSpec
from service.app import create_app
from service.registry import NoServableModel, failure_reason
from tests.testing import ServerThread, free_port, tiny_package
from tests.service_support import REPO_ROOT, config, metric_value, request_body

pytestmark = pytest.mark.slow


def _copy(repo: Path, src: int, dst: int) -> Path:
    out = repo / "synth" / str(dst)
    shutil.copytree(repo / "synth" / str(src), out)
    meta = json.loads((out / "metadata.json").read_text())
    if "version" in meta:
        meta["version"] = dst
        (out / "metadata.json").write_text(json.dumps(meta, indent=1))
    return out


def _reseal(pkg: Path) -> None:
    """Record the current model.onnx in metadata.json, so only deeper checks can refuse it."""
    meta = json.loads((pkg / "metadata.json").read_text())
    data = (pkg / "model.onnx").read_bytes()
    meta["onnx_sha256"] = hashlib.sha256(data).hexdigest()
    meta["onnx_bytes"] = len(data)
    (pkg / "metadata.json").write_text(json.dumps(meta, indent=1))


def damaged_repo(root: Path, spec: FeatureSpec, synth_dir: Path) -> Path:
    """synth/1 good; 2 checksum mismatch; 3 missing file; 4 a spec of another fit; 5 an onnx
    file that matches its checksum but does not load."""
    repo = root / "models"
    tiny_package(repo, "synth", 1, spec, seed=1)
    (_copy(repo, 1, 2) / "model.onnx").write_bytes(b"\x08\x07garbage" * 100)
    (_copy(repo, 1, 3) / "feature_spec.json").unlink()
    other = FeatureSpec.load("synthetic").fit(load_splits(synth_dir, ("train",))["train"].sample(n=500, random_state=1))
    other.save(_copy(repo, 1, 4) / "feature_spec.json")
    five = _copy(repo, 1, 5)
    (five / "model.onnx").write_bytes(b"\x08\x07not an onnx graph" * 50)
    _reseal(five)
    return repo


class Serve:
    """`ctr serve` in a child process; stdout and stderr together in `output` once stopped."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        import os

        self.port = free_port()
        cmd = [sys.executable, "-m", "ctr", "serve", "--workers", "1", "--port", str(self.port), *args]
        self.proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, **(env or {})})
        self.url = f"http://127.0.0.1:{self.port}"
        self.output = ""

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"ctr serve did not become ready:\n{self.output[-4000:]}")
            time.sleep(0.2)

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            out, _ = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        self.output += out or ""
        return self.output


def test_fresh_start_skips_bad_newest_versions_and_serves_the_newest_good(synth_spec, synth_dir, tmp_path):
    repo = damaged_repo(tmp_path, synth_spec, synth_dir)
    srv = Serve("--repo", str(repo), "--users", str(synth_dir / "users.parquet"), "--items", str(synth_dir / "items.parquet"),
                "--log-format", "json")
    try:
        srv.wait_ready()
        r = httpx.post(srv.url + "/score", json=request_body(synth_dir, 5), timeout=30)
        assert r.status_code == 200 and r.json()["version"] == 1
        metrics = httpx.get(srv.url + "/metrics", timeout=10).text
    finally:
        out = srv.stop()
    expected = {2: "checksum", 3: "missing_file", 4: "incompatible", 5: "onnx_load"}
    for reason in set(expected.values()):
        want = sum(1 for r in expected.values() if r == reason)
        assert metric_value(metrics, "ctr_model_load_failures_total", variant="main", reason=reason) == want, (reason, metrics)
    assert metric_value(metrics, "ctr_model_info", version="1") == 1
    records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    skipped = {r["version"]: r for r in records if r["event"] == "model_version_skipped"}
    assert sorted(skipped) == [2, 3, 4, 5], out[-4000:]
    for version, reason in expected.items():
        rec = skipped[version]
        assert rec["level"] == "WARNING" and rec["reason"] == reason and rec["model"] == "synth", rec
        assert {"time", "logger", "error"} <= set(rec)
    assert "Traceback" not in out
    providers = [r for r in records if r["event"] == "onnxruntime_providers"]
    assert len(providers) == 1 and providers[0]["level"] == "INFO", out[-4000:]
    assert "libonnxruntime_providers_cuda" not in out and "[E:onnxruntime" not in out, out[-4000:]


def test_no_servable_version_exits_non_zero_with_one_line(synth_spec, synth_dir, tmp_path):
    repo = damaged_repo(tmp_path, synth_spec, synth_dir)
    shutil.rmtree(repo / "synth" / "1")
    srv = Serve("--repo", str(repo))
    code = srv.proc.wait(120)
    out = srv.stop()
    assert code != 0, out
    assert "Traceback" not in out, out
    errors = [line for line in out.splitlines() if "error:" in line]
    assert len(errors) == 1, out
    assert errors[0].startswith("ctr serve: error: variant 'main': no servable version of model 'synth'")
    for part in ("5 (onnx_load)", "4 (incompatible)", "3 (missing_file)", "2 (checksum)"):
        assert part in errors[0]
    assert "model_version_skipped" in out  # the WARNINGs name each version


def test_pinned_bad_version_is_refused_without_falling_back(synth_spec, synth_dir, tmp_path):
    repo = damaged_repo(tmp_path, synth_spec, synth_dir)
    cfg = config(repo, synth_dir, variants=[{"name": "main", "model": "synth", "version": 2}])
    with pytest.raises(NoServableModel, match="pinned version 2 .* 2 \\(checksum\\)"):
        create_app(cfg)


def test_reload_to_a_bad_version_is_still_a_409_and_counted(synth_spec, synth_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("CTR_ADMIN_TOKEN", "tok")
    repo = tmp_path / "models"
    tiny_package(repo, "synth", 1, synth_spec, seed=1)
    with ServerThread(create_app(config(repo, synth_dir))) as srv:
        (_copy(repo, 1, 2) / "model.onnx").write_bytes(b"\x08\x07garbage" * 100)
        r = httpx.post(srv.url + "/admin/reload", headers={"Authorization": "Bearer tok"}, timeout=60)
        assert r.status_code == 409 and r.json()["results"][0]["result"] == "failed"
        assert httpx.post(srv.url + "/score", json=request_body(synth_dir, 3), timeout=30).json()["version"] == 1
        m = httpx.get(srv.url + "/metrics").text
        assert metric_value(m, "ctr_model_load_failures_total", reason="checksum") == 1
        assert metric_value(m, "ctr_reload_total", result="failed") == 1


def test_a_skipped_version_is_not_retried_by_polling(synth_spec, synth_dir, tmp_path):
    """Polling skips a version that already failed, so it is counted once, not every poll."""
    repo = tmp_path / "models"
    tiny_package(repo, "synth", 1, synth_spec, seed=1)
    (_copy(repo, 1, 2) / "model.onnx").write_bytes(b"\x08\x07garbage" * 100)
    with ServerThread(create_app(config(repo, synth_dir, reload_poll_s=0.05))) as srv:
        time.sleep(0.5)
        m = httpx.get(srv.url + "/metrics").text
        assert metric_value(m, "ctr_model_load_failures_total", reason="checksum") == 1
        assert metric_value(m, "ctr_reload_total", result="failed") == 0


@pytest.mark.parametrize(
    "message, reason",
    [
        ("synth/3: /m/synth/3: missing feature_spec.json", "missing_file"),
        ("synth/2: model.onnx sha256 mismatch: file ab…, metadata.json cd…", "checksum"),
        ("synth/2: model.onnx is 70 bytes but metadata.json says 6572: the file is truncated or was replaced", "checksum"),
        ("synth/4: feature_spec.json sha256 mismatch: it is not the spec this model was exported with", "incompatible"),
        ("synth/4: model takes 11 fields, spec has 12", "incompatible"),
        ("synth/5: model.onnx does not load (truncated or corrupt): DecodeError: Error parsing message", "onnx_load"),
        ("synth/5: something nobody foresaw", "invalid"),
    ],
)
def test_failure_reasons_are_a_small_fixed_set(message, reason):
    assert failure_reason(ValueError(message)) == reason
