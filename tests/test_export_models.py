"""Export + verify every model type from a tiny trained run directory.

Each run is trained for a few steps on the session's synthetic data with the training
code's own API (`fit_supervised`) and written with `run_io.save_run`, then exported with
`ctr export`, verified with `ctr export verify --torch-run` (fp32 parity at 1e-5 on fresh
rows) and scored from raw rows through the offline scorer.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

torch = pytest.importorskip("torch")
run_io = pytest.importorskip("model.run_io", reason="training code (model.run_io) not built yet")

from ctr.cli import main as ctr_main  # noqa: E402
from export.package import list_versions, verify_package  # noqa: E402
from model.networks import MODELS, model_config  # noqa: E402
from model.spec import FeatureSpec  # noqa: E402

MODEL_TYPES = ["dgenctr", "dnn", "deepfm", "dcnv2"]
# Small enough to train in a second on two cores, big enough to exercise every layer type.
TINY = {
    "dgenctr": {"d_model": 16, "layers": 1, "heads": 2, "ffn_mult": 2},
    "dnn": {"embedding_dim": 4, "hidden": [16, 8]},
    "deepfm": {"embedding_dim": 4, "hidden": [16, 8]},
    "dcnv2": {"embedding_dim": 4, "hidden": [16], "cross_layers": 2},
}


def _train_run(model_type: str, out: Path, synth_dir: Path, spec: FeatureSpec) -> Path:
    from model.data import load_encoded
    from model.networks import build_model
    from model.trainer import DistContext, TrainConfig, fit_supervised

    torch.manual_seed(0)
    spec, splits = load_encoded(spec, synth_dir, ("train", "valid"), max_rows=4000)
    cfg = model_config(model_type, TINY[model_type])
    model = build_model(model_type, cfg, spec.vocab_sizes)
    tcfg = TrainConfig(epochs=1, batch_size=256, max_steps_per_epoch=8, progress=False)
    result = fit_supervised(model, splits["train"], splits["valid"], tcfg, DistContext())
    config = {
        "model_type": model_type,
        "model": dataclasses.asdict(cfg),
        "train": dataclasses.asdict(tcfg),
        "data": {"dir": str(synth_dir), "fingerprint": f"synth-test-{model_type}"},
    }
    metrics = {"model": model_type, "valid": result.best_valid, "train_seconds": result.seconds}
    return run_io.save_run(out, model.eval(), spec, config, metrics)


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory: pytest.TempPathFactory, synth_dir: Path, synth_spec: FeatureSpec) -> dict[str, Path]:
    """One trained run per model type the training code provides (cached for the session)."""
    base = tmp_path_factory.mktemp("runs")
    return {mt: _train_run(mt, base / mt, synth_dir, synth_spec) for mt in MODEL_TYPES if mt in MODELS}


@pytest.fixture(scope="session")
def exported(tiny_runs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    repo = tmp_path_factory.mktemp("models")
    packages = {}
    for mt, run in tiny_runs.items():
        assert ctr_main(["export", "--run", str(run), "--repo", str(repo), "--name", mt]) == 0
        packages[mt] = repo / mt / "1"
    return repo, packages


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_export_and_verify_each_model_type(model_type: str, tiny_runs, exported, capsys) -> None:
    if model_type not in tiny_runs:
        pytest.skip(f"model type {model_type} is not in the training code yet")
    run = tiny_runs[model_type]
    _, packages = exported
    pkg = verify_package(packages[model_type])
    meta = pkg.metadata
    assert meta["model_type"] == model_type and meta["precision"] == "fp32"
    assert meta["data_fingerprint"] == f"synth-test-{model_type}"
    assert meta["metrics"]["valid"]["auc"] == json.loads((run / "metrics.json").read_text())["valid"]["auc"]
    assert meta["parity"]["max_abs_diff"] <= 1e-5
    assert pkg.spec.to_dict() == FeatureSpec.load(run / "feature_spec.json").to_dict()

    capsys.readouterr()
    assert ctr_main(["export", "verify", str(pkg.path), "--torch-run", str(run)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["parity"]["max_abs_diff"] <= 1e-5 and 1 in report["parity"]["batches"]


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_offline_scorer_matches_torch_on_raw_rows(model_type: str, tiny_runs, exported, synth_dir: Path) -> None:
    if model_type not in tiny_runs:
        pytest.skip(f"model type {model_type} is not in the training code yet")
    from export.offline_scorer import OfflineScorer
    from export.parity import torch_probabilities

    run = run_io.load_run(tiny_runs[model_type])
    rows = pd.read_parquet(synth_dir / "test.parquet").head(257)
    rows.loc[rows.index[:5], "item_id"] = "never-seen-item"  # unknown values -> OOV
    got = OfflineScorer(exported[1][model_type], intra_op_threads=1).score_rows(rows)
    want = torch_probabilities(run.model, run.spec.encode(rows, strict=False))
    assert got.dtype == np.float32 and np.max(np.abs(got - want)) <= 1e-5


def test_two_exports_of_one_run_get_distinct_versions(tiny_runs, tmp_path: Path) -> None:
    model_type = "dnn" if "dnn" in tiny_runs else next(iter(tiny_runs))
    run, repo = tiny_runs[model_type], tmp_path / "models"
    for _ in range(2):
        assert ctr_main(["export", "--run", str(run), "--repo", str(repo), "--name", "ctr"]) == 0
    assert list_versions(repo, "ctr") == [1, 2]
    a, b = (verify_package(repo / "ctr" / v) for v in ("1", "2"))
    assert a.metadata["onnx_sha256"] == b.metadata["onnx_sha256"] and (a.version, b.version) == (1, 2)
    assert ctr_main(["export", "--run", str(run), "--repo", str(repo), "--name", "ctr", "--version", "2"]) == 2


def test_verify_refuses_a_package_of_another_run(tiny_runs, exported, capsys) -> None:
    if not {"dnn", "deepfm"} <= set(tiny_runs):
        pytest.skip("needs two model types")
    _, packages = exported
    # Same spec, other weights: only the torch comparison can tell.
    assert ctr_main(["export", "verify", str(packages["dnn"]), "--torch-run", str(tiny_runs["deepfm"])]) == 1
    assert "REFUSED" in capsys.readouterr().err


def test_models_list_shows_every_version(exported, capsys) -> None:
    repo, packages = exported
    capsys.readouterr()
    assert ctr_main(["models", "list", "--repo", str(repo), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {(r["name"], r["version"], r["status"]) for r in rows} == {(mt, 1, "ok") for mt in packages}
    assert all(r["model_type"] == r["name"] for r in rows)
    assert ctr_main(["models", "list", "--repo", str(repo), "--verify"]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].split()[:2] == ["NAME", "VERSION"] and "REFUSED" not in table
