"""`ctr train` under torchrun: 2 CPU processes (gloo) match the single-process run's quality."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ARGS = ["--spec", "synthetic", "--model", "dnn", "--epochs", "3", "--batch-size", "512", "--max-rows", "8000",
        "--no-progress", "--seed", "5", "--hidden", "64,64"]


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)


@pytest.mark.slow
def test_two_process_ddp_matches_single_process(tmp_path, synth_dir):
    single = tmp_path / "single"
    ddp = tmp_path / "ddp"
    one = _run([sys.executable, "-m", "ctr", "train", "--data", str(synth_dir), "--out", str(single), "--threads", "1", *ARGS])
    assert one.returncode == 0, one.stderr[-3000:]
    two = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "ctr", "train",
                "--data", str(synth_dir), "--out", str(ddp), "--threads", "1", *ARGS])
    assert two.returncode == 0, two.stderr[-3000:]
    a = json.loads((single / "metrics.json").read_text())
    b = json.loads((ddp / "metrics.json").read_text())
    assert b["world_size"] == 2 and a["world_size"] == 1
    # Same global batch and epochs: the two runs differ only in dropout streams and batch order.
    assert abs(a["test"]["auc"] - b["test"]["auc"]) < 0.02, (a["test"], b["test"])
    assert b["test"]["auc"] > 0.6
    # Both ranks stopped at the same epoch (the decision is broadcast) and only rank 0 wrote the run.
    assert sorted(p.name for p in ddp.iterdir()) == ["config.json", "feature_spec.json", "metrics.json", "model.safetensors"]
    assert two.stdout.count('"variant"') == 1


@pytest.mark.slow
def test_dgenctr_both_stages_run_under_ddp(tmp_path, synth_dir):
    out = tmp_path / "dg"
    res = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "ctr", "train",
                "--data", str(synth_dir), "--out", str(out), "--threads", "1", "--spec", "synthetic", "--model", "dgenctr",
                "--epochs", "1", "--pretrain-epochs", "1", "--batch-size", "512", "--max-rows", "3000", "--no-progress",
                "--d-model", "16", "--heads", "2", "--layers", "1"])
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["pretrain"]["transferred_tensors"] > 10
    assert (out / "pretrained.safetensors").exists()
