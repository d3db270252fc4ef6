"""SGCTR on a tiny trained DGenCTR package: refinement graphs, their parity, verify, `ctr evaluate`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from export.package import PackageError, verify_package
from tests.service_support import REPO_ROOT, trained_package  # noqa: F401  (session fixture)
from testtime.sgctr import SGCTR_MANIFEST, SgctrConfig, read_manifest

# Exporting three refinement graphs takes ~30 s of CPU; the limit leaves room for a loaded machine.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


def _ctr(*argv: str, check: bool = True, torch_free: bool = False) -> subprocess.CompletedProcess:
    code = (
        "import sys\n"
        "from ctr.cli import main\n"
        f"rc = main({list(argv)!r})\n"
        + ("assert 'torch' not in sys.modules, 'imported torch'\n" if torch_free else "")
        + "sys.exit(rc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=1200)
    if check:
        assert out.returncode == 0, out.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def sgctr_package(trained_package: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:  # noqa: F811
    """(package copy with refinement graphs for R = 1, 2, 3, the run it came from)."""
    run = trained_package.parent.parent.parent / "run"
    dst = tmp_path_factory.mktemp("sgctr") / "models" / "synth" / "1"
    shutil.copytree(trained_package, dst)
    _ctr("sgctr", "export", "--run", str(run), "--package", str(dst), "--passes", "1,2,3", "--generator-rows", "512")
    return dst, run


def test_refinement_graph_parity_for_every_r(sgctr_package: tuple[Path, Path]):
    from export.parity import check_parity
    from model.refine import Refiner
    from model.run_io import load_run

    package, run_dir = sgctr_package
    manifest = read_manifest(package)
    assert manifest is not None and manifest["generator"]["rows"] > 0
    by_r = {e["passes"]: e for e in manifest["graphs"]}
    assert sorted(by_r) == [1, 2, 3]
    run = load_run(run_dir)
    pkg = verify_package(package)
    for r, entry in by_r.items():
        assert entry["parity"]["ok"] and entry["parity"]["max_abs_diff"] <= 1e-5
        assert entry["runs_per_row"] == 2 * r + 1  # default: sweep over 2 field groups
        cfg = SgctrConfig(**{**entry["settings"], "passes": r})
        report = check_parity(Refiner(run.model, cfg, pkg.spec.field_names), package / entry["file"], pkg.spec, seed=1234 + r)
        assert report.max_abs_diff <= 1e-5, (r, report)


def test_verify_checks_the_refinement_graphs(sgctr_package: tuple[Path, Path], tmp_path: Path):
    package, _ = sgctr_package
    copy = tmp_path / "synth" / "1"
    shutil.copytree(package, copy)
    verify_package(copy)
    graph = copy / read_manifest(copy)["graphs"][0]["file"]
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0x01
    graph.write_bytes(bytes(data))
    with pytest.raises(PackageError, match="does not match the sha256"):
        verify_package(copy)
    (copy / SGCTR_MANIFEST).unlink()
    with pytest.raises(PackageError, match="sgctr.json is missing"):
        verify_package(copy)
    shutil.rmtree(copy / "sgctr")
    verify_package(copy)  # no refinement graphs: a plain package again


def _evaluate(package: Path, data: Path, *args: str) -> dict:
    out = _ctr("evaluate", "--package", str(package), "--data", str(data), "--split", "valid", *args, torch_free=True)
    return json.loads(out.stdout)


def test_evaluate_sgctr_and_noise(sgctr_package: tuple[Path, Path], synth_dir: Path):
    package, _ = sgctr_package
    plain = _evaluate(package, synth_dir)
    r0 = _evaluate(package, synth_dir, "--test-time", "sgctr", "--set", "passes=0")
    assert r0["auc"] == plain["auc"] and r0["model_rows"] == plain["rows"]
    r2 = _evaluate(package, synth_dir, "--test-time", "sgctr", "--set", "passes=2")
    assert 0.5 < r2["auc"] <= 1 and r2["auc"] != plain["auc"]
    assert r2["model_rows"] == 5 * r2["rows"] and r2["test_time"]["method"] == "sgctr"

    noisy = _evaluate(package, synth_dir, "--noise", "0.2", "--noise-seed", "3")
    again = _evaluate(package, synth_dir, "--noise", "0.2", "--noise-seed", "3")
    assert noisy["auc"] == again["auc"] and noisy["auc"] < plain["auc"]
    assert abs(noisy["noise"]["chosen"] - 0.2) < 0.02
    noisy_r1 = _evaluate(package, synth_dir, "--test-time", "sgctr", "--set", "passes=1", "--noise", "0.2", "--noise-seed", "3")
    assert np.isfinite(noisy_r1["auc"]) and noisy_r1["noise"] == noisy["noise"]

    missing = _ctr("evaluate", "--package", str(package), "--data", str(synth_dir), "--test-time", "sgctr",
                   "--set", "passes=1", "--set", "selection=random", check=False)
    assert missing.returncode != 0 and "no refinement graph" in missing.stderr
