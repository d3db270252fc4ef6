"""Post-hoc Platt calibration: the fit itself, the run directory, and the exported graph."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from ctr.cli import main
from model.calibration import Calibrated, PlattScaling, fit_platt


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def test_fit_recovers_the_scale_of_an_over_confident_logit():
    rng = np.random.default_rng(0)
    true = rng.normal(0.0, 3.0, 50_000)
    labels = (rng.random(true.size) < _sigmoid(0.5 * true - 1.0)).astype(np.int64)
    fit = fit_platt(2.0 * true, labels)  # the "network" is 4x too confident and its bias is off
    assert fit is not None and fit.rows == true.size
    assert fit.scale == pytest.approx(0.25, abs=0.01) and fit.bias == pytest.approx(-1.0, abs=0.05)


@pytest.mark.parametrize("case", ["one_class", "too_few_rows", "anti_correlated", "non_finite"])
def test_fit_refuses_what_it_cannot_calibrate_soundly(case):
    rng = np.random.default_rng(1)
    z = rng.normal(size=5000)
    y = (rng.random(5000) < _sigmoid(z)).astype(np.int64)
    if case == "one_class":
        y[:] = 0
    elif case == "too_few_rows":
        z, y = z[:20], y[:20]
    elif case == "anti_correlated":
        z = -z
    else:
        z[3] = np.nan
    assert fit_platt(z, y) is None


@pytest.mark.parametrize("bad", [{"scale": -1.0, "bias": 0.0}, {"scale": float("nan"), "bias": 0.0}, {"bias": 0.0},
                                 {"method": "isotonic", "scale": 1.0, "bias": 0.0}])
def test_a_calibration_that_would_reorder_or_is_unknown_is_refused(bad):
    with pytest.raises((ValueError, KeyError)):
        PlattScaling.from_dict(bad)


def _train(out: Path, data: Path, *extra: str) -> dict:
    assert main(["train", "--spec", "synthetic", "--data", str(data), "--model", "dnn", "--out", str(out), "--epochs", "3",
                 "--batch-size", "512", "--hidden", "64,64", "--no-progress", "--threads", "1", *extra]) == 0
    return json.loads((out / "metrics.json").read_text())


@pytest.fixture(scope="module")
def calibrated_run(tmp_path_factory, synth_dir) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("calibrated") / "dnn"
    return out, _train(out, synth_dir)


def test_a_run_fits_on_valid_and_reports_raw_and_calibrated_metrics(calibrated_run):
    run, metrics = calibrated_run
    cal = metrics["calibrated"]
    assert cal["method"] == "platt" and cal["fitted_on"] == "valid" and cal["scale"] > 0
    assert cal["rows"] == json.loads((run / "config.json").read_text())["data"]["rows"]["valid"]
    # The fit minimises valid logloss over a family that contains the identity, so it cannot lose there.
    assert cal["valid"]["logloss"] <= metrics["valid"]["logloss"] + 1e-6
    # A positive scale keeps the order: ranking metrics are the raw network's.
    for split in ("valid", "test"):
        assert cal[split]["auc"] == pytest.approx(metrics[split]["auc"], abs=1e-4)
        assert cal[split]["gauc"] == pytest.approx(metrics[split]["gauc"], abs=1e-4)
    assert json.loads((run / "config.json").read_text())["calibration"]["scale"] == cal["scale"]


def test_load_run_scores_calibrated_and_export_carries_it_into_the_graph(calibrated_run, synth_dir, tmp_path):
    import onnxruntime as ort

    from model.metrics import logloss
    from model.run_io import load_run
    from model.trainer import predict, predict_logits

    run_dir, metrics = calibrated_run
    run = load_run(run_dir)
    assert isinstance(run.model, Calibrated) and not run.model.training
    test = pd.read_parquet(synth_dir / "test.parquet")
    tokens = run.spec.encode(test)
    probs = predict(run.model, torch.from_numpy(tokens))
    assert logloss(test["label"].to_numpy(), probs) == pytest.approx(metrics["calibrated"]["test"]["logloss"], abs=1e-6)

    repo = tmp_path / "models"
    assert main(["export", "--run", str(run_dir), "--repo", str(repo), "--name", "cal"]) == 0
    pkg = repo / "cal" / "1"
    meta = json.loads((pkg / "metadata.json").read_text())
    assert meta["calibration"]["scale"] == metrics["calibrated"]["scale"]
    sess = ort.InferenceSession(str(pkg / "model.onnx"), providers=["CPUExecutionProvider"])
    (served,) = sess.run(None, {sess.get_inputs()[0].name: tokens[:500]})
    raw = predict_logits(run.model.model, torch.from_numpy(tokens[:500]))
    want = _sigmoid(metrics["calibrated"]["scale"] * raw.astype(np.float64) + metrics["calibrated"]["bias"])
    assert np.max(np.abs(served - want)) <= 1e-5
    assert np.max(np.abs(served - _sigmoid(raw.astype(np.float64)))) > 1e-4  # it is not the raw network


def test_calibration_none_keeps_the_raw_network(tmp_path, synth_dir):
    from model.run_io import load_run

    metrics = _train(tmp_path / "raw", synth_dir, "--calibration", "none", "--epochs", "1")
    assert "calibrated" not in metrics
    assert json.loads((tmp_path / "raw" / "config.json").read_text())["calibration"] is None
    assert not isinstance(load_run(tmp_path / "raw").model, Calibrated)


def test_a_corrupt_calibration_in_config_is_refused_by_load_and_export(calibrated_run, tmp_path, capsys):
    import shutil

    from model.run_io import load_run

    run = tmp_path / "run"
    shutil.copytree(calibrated_run[0], run)
    config = json.loads((run / "config.json").read_text())
    config["calibration"]["scale"] = -0.5
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="calibration"):
        load_run(run)
    assert main(["export", "--run", str(run), "--repo", str(tmp_path / "models"), "--name", "bad"]) != 0
    assert "bad calibration" in capsys.readouterr().err
    assert not (tmp_path / "models" / "bad").exists()
