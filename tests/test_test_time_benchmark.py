"""benchmarks/test_time.py: the MATT benchmark end to end on two tiny DNN runs (two seeds).

The runs are real `ctr train` runs laid out as a benchmarks/quality.py --datasets output
(runs/DATASET/MODEL-seedN, results_partial.json, datasets.json); the benchmark exports them,
builds their statistics and scores the whole grid through onnxruntime, with splits capped.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from tests.testing import load_script

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


TT = load_script(REPO / "benchmarks" / "test_time.py", "test_time_benchmark")


@pytest.fixture(scope="module")
def quality_out(synth_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("quality")
    for seed in (1, 2):
        run = out / "runs" / "synth" / f"dnn-seed{seed}"
        argv = ["train", "--spec", "synthetic", "--data", str(synth_dir), "--out", str(run), "--model", "dnn",
                "--seed", str(seed), "--epochs", "1", "--max-rows", "2000", "--batch-size", "512", "--hidden", "8",
                "--embedding-dim", "4", "--no-progress", "--threads", "1", "--log-level", "WARNING"]
        proc = subprocess.run([sys.executable, "-m", "ctr", *argv], cwd=REPO, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    (out / "results_partial.json").write_text(json.dumps([{"dataset": "synth", "model": "dnn", "seed": s} for s in (1, 2)]))
    (out / "datasets.json").write_text(json.dumps({"synth": {"spec": "synthetic", "dir": str(synth_dir), "meta": None}}))
    return out


def _bench(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "benchmarks" / "test_time.py"), *args, "--quick", "--threads", "1"]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)


def test_the_grid_runs_end_to_end_paired_by_seed_and_resumes(quality_out: Path):
    from ctr.cli import main

    proc = _bench(str(quality_out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    distinct = {TT.config_id(s) for s in TT.VALID_GRID}, {TT.config_id(s) for s in TT.TEST_CONFIGS}
    per_run = len(distinct[0]) + len(distinct[1])
    assert per_run == 18  # M=8 "all" is in four groups, M=1 is plain: scored once each
    assert f"[{2 * per_run}/{2 * per_run}] synth dnn seed=2 test" in proc.stderr  # progress on stderr
    out = quality_out / "test_time"
    result = json.loads((out / "test_time.json").read_text())
    assert len(result["evaluations"]) == 2 * per_run and result["quick"] and result["max_rows"] == TT.QUICK["max_rows"]

    # Each package carries its statistics (copied or built) and verifies with them.
    for run in result["runs"]:
        assert run["stats"]["status"] in ("built", "copied")
        assert (Path(run["package"]) / "test_time_stats.npz").is_file()
        assert main(["export", "verify", run["package"]]) == 0

    block = result["summary"]["synth"]["dnn"]
    assert block["seeds"] == [1, 2]
    evals = {(e["seed"], e["split"], e["config_id"]): e for e in result["evaluations"]}
    test = block["test"]
    assert list(test) == [s.label for s in TT.TEST_CONFIGS]
    for setting in TT.TEST_CONFIGS[1:]:
        row, cid = test[setting.label], TT.config_id(setting)
        assert set(row["per_seed"]) == {"1", "2"} and row["delta_auc"]["n"] == 2
        deltas = [evals[(s, "test", cid)]["auc"] - evals[(s, "test", "plain")]["auc"] for s in (1, 2)]
        assert row["delta_auc"]["mean"] == pytest.approx(statistics.fmean(deltas))
        assert row["delta_auc"]["std"] == pytest.approx(statistics.stdev(deltas))
        assert row["per_seed"]["2"]["auc"] == evals[(2, "test", cid)]["auc"]
    default = test[TT.FULL]
    assert default["model_rows_per_row"] == 8 and default["share_with_paths"] == 1.0
    assert evals[(1, "test", TT.config_id(TT.TEST_CONFIGS[1]))]["test_time"]["paths"] == 8
    for label in TT.SELECTIVE:
        assert "gain_kept" in test[label] and test[label]["model_rows_per_row"] <= 8

    valid = {(r["group"], r["label"]): r for r in block["valid"]}
    assert list(valid) == [(s.group, s.label) for s in TT.VALID_GRID]
    for m in (1, 2, 4, 8, 16):
        assert valid[("paths (trigger all)", f"M={m}")]["model_rows_per_row"] == m
    assert valid[("paths (trigger all)", "M=1")]["delta_auc"]["mean"] == 0
    assert valid[("heavy hitters (M=8, all)", "heap off")]["config"]["heavy_hitters"] is False
    assert valid[("heavy hitters (M=8, all)", "heap off, lower bounds")]["config"]["frequency"] == "lower"
    on, off = (valid[("heavy hitters (M=8, all)", f"heap {x}")] for x in ("on", "off"))
    assert on["auc"] == valid[("paths (trigger all)", "M=8")]["auc"]  # the same configuration, scored once
    uniform, guided = (valid[("sampling (all)", f"{x} M=4")] for x in ("uniform", "confidence"))
    assert uniform["auc"]["mean"] != guided["auc"]["mean"]
    text = (out / "test_time.md").read_text()
    assert "#### synth · dnn (seeds 1, 2)" in text and "| heavy hitters (M=8, all) | heap off |" in text

    # --resume: every evaluation is in the partial file; nothing is scored again.
    again = _bench(str(quality_out), "--resume")
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming: {2 * per_run} evaluation(s)" in again.stderr and "] synth dnn" not in again.stderr
    assert json.loads((out / "test_time.json").read_text())["summary"] == result["summary"]


def test_gain_kept_is_the_selective_share_of_the_full_gain():
    full = {"delta_auc": {"mean": 0.002, "std": 0.0, "n": 3}}
    assert TT.gain_kept({"delta_auc": {"mean": 0.0015, "std": 0.0, "n": 3}}, full) == pytest.approx(0.75)
    assert TT.gain_kept({"delta_auc": {"mean": 0.001, "std": 0.0, "n": 3}}, {"delta_auc": {"mean": -0.001}}) is None
    assert TT.gain_kept(None, full) is None


def test_quality_benchmark_runs_it_after_training(tmp_path: Path):
    """`benchmarks/quality.py --test-time matt`: train (--quick), then the MATT grid on the runs."""
    out = tmp_path / "q"
    cmd = [sys.executable, str(REPO / "benchmarks" / "quality.py"), "--datasets", "synthetic-mixed-300k", "--models", "dnn",
           "--quick", "--threads", "1", "--no-progress", "--out", str(out), "--test-time", "matt"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "test_time" / "test_time.json").read_text())
    assert [(r["dataset"], r["model"], r["seed"]) for r in result["runs"]] == [("synthetic-mixed-300k", "dnn", 1)]
    assert result["quick"] and len(result["evaluations"]) == 18
    assert result["runs"][0]["package"].startswith(str(out / "test_time" / "models"))
    assert "#### synthetic-mixed-300k · dnn (seeds 1)" in (out / "test_time" / "test_time.md").read_text()
