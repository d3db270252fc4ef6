"""`ctr stats build`, the package checksum and `ctr evaluate`, on a tiny trained package."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ctr.cli import main
from tests.service_support import REPO_ROOT, trained_package  # noqa: F401  (session fixture)
from testtime.stats import MANIFEST_FILE, STATS_FILE

pytestmark = pytest.mark.slow


@pytest.fixture()
def package(trained_package: Path, tmp_path: Path) -> Path:  # noqa: F811
    """A private copy: these tests write into the package folder."""
    dst = tmp_path / "models" / "synth" / "1"
    shutil.copytree(trained_package, dst)
    return dst


def _json(capsys) -> dict:
    return json.loads(capsys.readouterr().out)


def test_stats_file_is_checked_by_export_verify(package: Path, synth_dir: Path, capsys):
    assert main(["export", "verify", str(package)]) == 0  # no statistics: still a valid package
    capsys.readouterr()
    assert main(["stats", "build", "--package", str(package), "--data", str(synth_dir), "--width-log2", "12"]) == 0
    built = _json(capsys)
    assert built["rows"] > 0 and (package / STATS_FILE).is_file() and (package / MANIFEST_FILE).is_file()
    assert main(["export", "verify", str(package)]) == 0
    capsys.readouterr()

    good = (package / STATS_FILE).read_bytes()
    bad = bytearray(good)
    bad[len(bad) // 3] ^= 0x10
    (package / STATS_FILE).write_bytes(bytes(bad))
    assert main(["export", "verify", str(package)]) == 1
    assert "test_time_stats.npz does not match the sha256" in capsys.readouterr().err

    (package / STATS_FILE).write_bytes(good)
    manifest = (package / MANIFEST_FILE).read_text()
    (package / MANIFEST_FILE).unlink()
    assert main(["export", "verify", str(package)]) == 1
    assert "come together" in capsys.readouterr().err

    doc = json.loads(manifest)
    doc["feature_spec_sha256"] = "0" * 64
    (package / MANIFEST_FILE).write_text(json.dumps(doc))
    assert main(["export", "verify", str(package)]) == 1
    assert "another feature_spec.json" in capsys.readouterr().err


def _evaluate(package: Path, data: Path, *args: str) -> dict:
    """`ctr evaluate` in a fresh interpreter that must never import torch."""
    code = (
        "import json, sys\n"
        "from ctr.cli import main\n"
        f"rc = main({['evaluate', '--package', str(package), '--data', str(data), '--split', 'valid', *args]!r})\n"
        "assert 'torch' not in sys.modules, 'ctr evaluate imported torch'\n"
        "sys.exit(rc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


def test_evaluate_plain_and_matt(package: Path, synth_dir: Path):
    assert main(["stats", "build", "--package", str(package), "--data", str(synth_dir), "--width-log2", "14"]) == 0
    plain = _evaluate(package, synth_dir)
    assert plain["rows"] > 0 and 0.5 < plain["auc"] <= 1 and plain["logloss"] > 0 and plain["gauc"] is not None
    assert plain["share_with_extra_paths"] == 0 and plain["model_rows"] == plain["rows"] and plain["rows_per_second"] > 0

    one = _evaluate(package, synth_dir, "--test-time", "matt", "--set", "paths=1")
    assert one["auc"] == plain["auc"] and one["logloss"] == plain["logloss"]

    full = _evaluate(package, synth_dir, "--test-time", "matt", "--set", "paths=4", "--set", "trigger=all")
    assert full["share_with_extra_paths"] == 1.0 and full["model_rows"] == 4 * full["rows"]
    assert full["auc"] != plain["auc"] and abs(full["auc"] - plain["auc"]) < 0.05
    assert full["test_time"]["paths"] == 4 and full["replacement_token"] == 1  # DGenCTR: OOV

    sel = _evaluate(package, synth_dir, "--test-time", "matt", "--set", "paths=4", "--set", "trigger=uncertain",
                    "--set", "uncertain_min_conf=0.3", "--set", "uncertain_logit_band=0", "--set", "frequency=lower",
                    "--set", "kappa=[20,10,5]")
    assert 0 < sel["share_with_extra_paths"] < 1
    assert sel["model_rows"] == sel["rows"] + 3 * round(sel["share_with_extra_paths"] * sel["rows"])

    # The default trigger reads the plain score (two calls: plain rows, then the extra rows only).
    # This tiny model scores every row near the base rate, so a narrow band tells rows apart.
    wide = _evaluate(package, synth_dir, "--test-time", "matt", "--set", "paths=4", "--set", "trigger=uncertain")
    narrow = _evaluate(package, synth_dir, "--test-time", "matt", "--set", "paths=4", "--set", "trigger=uncertain",
                       "--set", "uncertain_logit_band=0.02")
    assert 0 < narrow["share_with_extra_paths"] < wide["share_with_extra_paths"]
    for band in (wide, narrow):
        assert band["model_rows"] == band["rows"] + 3 * round(band["share_with_extra_paths"] * band["rows"])


def test_evaluate_refuses_matt_without_statistics_and_bad_settings(package: Path, synth_dir: Path, capsys):
    assert main(["evaluate", "--package", str(package), "--data", str(synth_dir), "--split", "valid",
                 "--test-time", "matt"]) == 2
    assert "ctr stats build" in capsys.readouterr().err
    assert main(["evaluate", "--package", str(package), "--data", str(synth_dir), "--test-time", "matt",
                 "--set", "paths=zero"]) == 2
    assert "paths" in capsys.readouterr().err


def test_stats_shards_merge_from_the_command_line(package: Path, synth_dir: Path, tmp_path: Path, capsys):
    import numpy as np
    import pandas as pd

    from testtime.stats import ComboStats

    train = pd.read_parquet(next(synth_dir.glob("train.*")))
    half = len(train) // 2
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    train.iloc[:half].to_parquet(tmp_path / "a" / "train.parquet")
    train.iloc[half:].to_parquet(tmp_path / "b" / "train.parquet")
    spec = str(package / "feature_spec.json")
    for part in ("a", "b"):
        assert main(["stats", "build", "--spec", spec, "--data", str(tmp_path / part), "--out",
                     str(tmp_path / f"{part}.npz"), "--width-log2", "12"]) == 0
    assert main(["stats", "merge", str(tmp_path / "a.npz"), str(tmp_path / "b.npz"), "--out", str(tmp_path / "ab.npz")]) == 0
    assert main(["stats", "build", "--spec", spec, "--data", str(synth_dir), "--out", str(tmp_path / "one.npz"),
                 "--width-log2", "12"]) == 0
    capsys.readouterr()
    merged, one = ComboStats.load(tmp_path / "ab.npz"), ComboStats.load(tmp_path / "one.npz")
    assert merged.rows == one.rows == len(train)
    for o in (2, 3):
        assert np.array_equal(merged.sketches[o].table, one.sketches[o].table)


def test_stats_build_into_a_run_folder(trained_package: Path, tmp_path: Path, capsys):  # noqa: F811
    """`--run` reads the run's spec and, without --data, the data directory its config.json names."""
    meta = json.loads((trained_package / "metadata.json").read_text())
    run = tmp_path / "run"
    shutil.copytree(meta["source_run"], run)
    assert main(["stats", "build", "--run", str(run), "--width-log2", "12", "--orders", "1,2"]) == 0
    out = _json(capsys)
    assert out["orders"] == [1, 2] and out["rows"] > 0 and (run / STATS_FILE).is_file()
