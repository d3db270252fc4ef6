"""benchmarks/quality.py: every variant is a shipped recipe file (what `ctr train --config` runs), and it runs end to end."""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from ctr.cli import build_parser
from model import run_config as recipes
from model.networks import model_config
from model.train_cli import build_run_config
from tests.testing import load_script

REPO = Path(__file__).resolve().parents[1]


QUALITY = load_script(REPO / "benchmarks" / "quality.py", "quality_benchmark")
# The command-line spelling of each ablation's change to its recipe.
ABLATION_FLAGS = {"dgenctr-scratch": ["--pretrain-mode", "none"], "dgenctr-emb-only": ["--pretrain-mode", "embedding"],
                  "dgenctr-no-label": ["--no-label-mask"]}


def _settings(cfg) -> dict:
    """What a run's result depends on, with the model's options spelt out in full."""
    got = dataclasses.asdict(cfg)
    got["model"] = dataclasses.asdict(model_config(cfg.model_type, cfg.model))
    return got


@pytest.mark.parametrize("spec", ["frappe_x1", "synthetic"])
@pytest.mark.parametrize("variant", QUALITY.VARIANTS)
def test_every_variant_runs_a_shipped_recipe_as_ctr_train_would(variant, spec):
    """Why: a benchmark figure must be what `ctr train --config recipes/...` gives. The presets used
    to be a second copy of the documented settings in this script; now both read one file."""
    name, changes = QUALITY.recipe_of(variant, spec)
    path = recipes.find_recipe(name)
    assert path.is_relative_to(recipes.recipe_dir())  # shipped, not a file lying in the working directory
    args = argparse.Namespace(max_epochs=0, patience=0, pretrain_epochs=0, no_progress=True, spec=spec, data="D", threads=1)
    pretrained = Path("P.safetensors") if variant == "dgenctr-emb-only" else None
    bench = QUALITY.run_config(variant, 3, args, Path("O"), pretrained)
    argv = ["train", "--config", str(path), "--spec", spec, "--data", "D", "--out", "O", "--seed", "3", "--threads", "1",
            "--no-progress", *ABLATION_FLAGS.get(variant, []), *(["--pretrained", str(pretrained)] if pretrained else [])]
    cli = build_run_config(build_parser().parse_args(argv), recipes.load(path))
    assert _settings(bench) == _settings(cli)
    expected_type = "dgenctr" if variant.startswith("dgenctr") else variant.removesuffix("-masked")
    assert bench.model_type == expected_type
    masked = {"dnn-masked": "dnn-fmask-ema", "dgenctr-masked": "dgenctr-scratch-fmask-ema",
              "dgenctr-masked-2stage": "dgenctr-shrink-fmask-ema"}
    assert bench.variant() == masked.get(variant, variant)  # the run's own name for what it trains


def test_benchmark_knobs_override_the_recipe():
    args = argparse.Namespace(max_epochs=1, patience=4, pretrain_epochs=2, no_progress=True, spec="frappe_x1", data="D", threads=1)
    cfg = QUALITY.run_config("dgenctr-masked-2stage", 1, args, Path("O"), None)
    assert (cfg.train.epochs, cfg.train.patience, cfg.pretrain.epochs, cfg.train.seed) == (1, 4, 2, 1)
    assert cfg.transfer_keep == 0.25 and cfg.train.ema_decay == 0.995  # the rest stays the recipe's


@pytest.mark.parametrize("variant", sorted(QUALITY.MASKED_RECIPES))
def test_masked_variants_are_opt_in(variant):
    assert variant not in QUALITY.DEFAULT_VARIANTS  # opt-in: they do not fit the 90-minute budget


def test_benchmark_runs_the_masked_recipe_end_to_end(tmp_path):
    out = tmp_path / "q"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "quality.py"), "--synthetic-rows", "3000", "--seeds", "1",
         "--models", "dnn-masked,dgenctr-masked,dgenctr-masked-2stage", "--max-epochs", "1", "--pretrain-epochs", "1", "--threads", "1", "--no-progress", "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((out / "quality.json").read_text())
    assert set(result["table"]) == {"dnn-masked", "dgenctr-masked", "dgenctr-masked-2stage"}
    assert result["recipes"]["dgenctr-masked-2stage"]["recipe"] == "frappe_x1/dgenctr"
    assert (out / "quality.png").stat().st_size > 0
    for variant, ema in (("dnn-masked", 0.98), ("dgenctr-masked", 0.995), ("dgenctr-masked-2stage", 0.995)):
        config = json.loads((out / "runs" / f"{variant}-seed1" / "config.json").read_text())
        assert config["train"]["ema_decay"] == ema and config["train"]["lr_decay"] == 1.0
        assert config["run"]["train"]["epochs"] == 1  # --max-epochs over the recipe's 40
        assert 0.5 < result["table"][variant]["test_auc_mean"] <= 1.0
    two_stage = json.loads((out / "runs" / "dgenctr-masked-2stage-seed1" / "config.json").read_text())["train"]
    assert two_stage["pretrain_mode"] == "full" and two_stage["transfer_keep"] == 0.25
    assert (out / "runs" / "dgenctr-masked-2stage-seed1" / "pretrained.safetensors").exists()


# --- the multi-data-set benchmark (--datasets) -----------------------------------------------

SHARED_DATA = REPO.parent / "shared" / "data"


def test_dataset_names_and_patterns_resolve_to_the_registry():
    names = [d.name for d in QUALITY.select_datasets("frappe_x1,movielens100k,synthetic-*")]
    assert names[:2] == ["frappe_x1", "movielens100k"]
    family = {f"{m}-{size}" for m in ("synthetic-latent", "synthetic-context", "synthetic-nonlinear", "synthetic-noisy",
                                      "synthetic-longtail", "synthetic-mixed") for size in ("300k", "1m")}
    assert set(names[2:]) == family and len(names) == len(set(names))
    assert [d.name for d in QUALITY.select_datasets("synthetic-mixed")] == ["synthetic-mixed-300k", "synthetic-mixed-1m"]
    one = QUALITY.select_datasets("synthetic-noisy-1m")[0]
    assert (one.spec, one.rows, one.synthetic) == ("synthetic-noisy", 1_000_000, True)
    with pytest.raises(ValueError, match="unknown data set 'movielens'.*frappe_x1"):
        QUALITY.select_datasets("movielens")


def test_model_names_are_recipe_files_with_the_generic_fallback_and_ablations():
    ml, mixed, frappe = QUALITY.select_datasets("movielens100k,synthetic-mixed-1m,frappe_x1")
    assert QUALITY.dataset_recipe("dgenctr", ml) == ("movielens100k/dgenctr", {})
    assert QUALITY.dataset_recipe("dnn", mixed) == ("synthetic/dnn", {})  # no recipes of its own yet
    assert QUALITY.dataset_recipe("dgenctr", frappe) == ("frappe_x1/dgenctr", {})  # the recommended recipe
    assert QUALITY.dataset_recipe("dgenctr-scratch", frappe) == ("frappe_x1/dgenctr-scratch", {})  # a file wins
    assert QUALITY.dataset_recipe("dgenctr-scratch", ml) == ("movielens100k/dgenctr", {"pretrain_mode": "none"})
    with pytest.raises(ValueError, match="no recipe 'gbdt' for movielens100k"):
        QUALITY.dataset_recipe("gbdt", ml)


@pytest.mark.parametrize("model", ["dnn", "deepfm", "dcnv2", "dgenctr", "dgenctr-no-label"])
def test_a_benchmark_run_is_ctr_train_with_the_recipe_and_the_quick_knobs(model):
    """Why: a benchmark figure must be what `ctr train --config` gives with the same file and
    overrides; --quick only caps epochs and rows."""
    ds = QUALITY.select_datasets("movielens100k")[0]
    args = argparse.Namespace(max_epochs=0, patience=0, pretrain_epochs=0, no_progress=True, threads=1, quick=True)
    bench, name, changes = QUALITY.bench_config(model, ds, Path("D"), 2, args, Path("O"))
    path = recipes.find_recipe(name)
    sets = ["train.epochs=1", f"max_rows={QUALITY.QUICK['max_rows']}"] + (["pretrain.epochs=1"] if model.startswith("dgenctr") else [])
    argv = ["train", "--config", str(path), "--spec", "movielens100k", "--data", "D", "--out", "O", "--seed", "2",
            "--threads", "1", "--no-progress", *ABLATION_FLAGS.get(model, []), *[x for s in sets for x in ("--set", s)]]
    cli = build_run_config(build_parser().parse_args(argv), recipes.load(path))
    assert _settings(bench) == _settings(cli)
    assert bench.train.epochs == 1 and bench.max_rows == QUALITY.QUICK["max_rows"]


def _record(dataset, model, seed, auc, logloss=0.4, seconds=10.0):
    return {"dataset": dataset, "model": model, "seed": seed, "recipe": f"x/{model}", "test": {"auc": auc, "logloss": logloss, "gauc": auc - 0.1},
            "calibrated_test": {"logloss": logloss - 0.01}, "seconds": seconds, "best_epoch": 2, "epochs_run": 4,
            "epoch_seconds": 2.0, "pretrain_epochs_run": 0, "pretrain_epoch_seconds": None}


def test_paired_differences_are_per_seed_and_gap_closed_is_against_the_bayes_auc():
    runs = [_record("syn", "dnn", s, a, seconds=10) for s, a in ((1, 0.70), (2, 0.72), (3, 0.71))]
    runs += [_record("syn", "dgenctr", s, a, seconds=30) for s, a in ((1, 0.73), (2, 0.73), (3, 0.73))]
    runs += [_record("syn", "dgenctr", 4, 0.99)]  # no DNN run with seed 4: left out of the pairs
    summary = QUALITY.summarise_datasets(runs, {"syn": {"bayes_auc": {"test": 0.80}}}, models_order=["dnn", "dgenctr"])["syn"]
    assert list(summary["models"]) == ["dnn", "dgenctr"]
    assert summary["models"]["dgenctr"]["auc"]["n"] == 4
    pair = summary["paired"]["dgenctr"]
    assert pair["seeds"] == [1, 2, 3]
    assert pair["auc"]["mean"] == pytest.approx(0.02) and pair["auc"]["std"] == pytest.approx(0.01)
    assert pair["auc_gain_exceeds_spread"] is True
    assert pair["time_ratio"]["mean"] == pytest.approx(3.0)
    closed = [(0.73 - b) / (0.80 - b) for b in (0.70, 0.72, 0.71)]
    assert pair["bayes_gap_closed"]["mean"] == pytest.approx(sum(closed) / 3)
    text = QUALITY.markdown({"syn": summary})
    assert "| dgenctr | +0.02000 ± 0.01000 |" in text and "DNN→Bayes gap closed" in text
    # On a data set without a known ceiling there is no gap column.
    assert "Bayes" not in QUALITY.markdown(QUALITY.summarise_datasets(runs[:6], {"syn": None}))


def test_quick_benchmark_runs_end_to_end_on_movielens_and_a_synthetic_member(tmp_path):
    """--quick is the CI form of the full benchmark: it builds MovieLens' splits and a synthetic
    member into the cache, trains every model on both, and writes the tables."""
    source = SHARED_DATA / "movielens100k"
    if not (source / "MovieLens100k_data.parquet").exists():
        pytest.skip(f"MovieLens-100k files not found at {source}")
    out = tmp_path / "q"
    cmd = [sys.executable, str(REPO / "benchmarks" / "quality.py"), "--datasets", "movielens100k,synthetic-mixed-300k",
           "--models", "dnn,dgenctr", "--quick", "--threads", "1", "--no-progress", "--movielens-source", str(source),
           "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[4/4] synthetic-mixed-300k" in proc.stdout  # progress, one line per run
    result = json.loads((out / "quality.json").read_text())
    assert result["quick"] and result["seeds"] == [1]
    synth_dir = out / "data" / f"synthetic-mixed-{QUALITY.QUICK['synthetic_rows']}rows-seed{QUALITY.SYNTH_SEED}"
    meta = json.loads((synth_dir / "meta.json").read_text())
    assert meta["config"]["seed"] == QUALITY.SYNTH_SEED and sum(meta["rows"].values()) == QUALITY.QUICK["synthetic_rows"]
    for dataset in ("movielens100k", "synthetic-mixed-300k"):
        block = result["summary"][dataset]
        assert list(block["models"]) == ["dnn", "dgenctr"]
        for row in block["models"].values():
            assert 0.3 < row["auc"]["mean"] < 1.0 and row["logloss"]["mean"] > 0 and row["seconds"]["mean"] > 0
            assert 0.0 <= row["gauc"]["mean"] <= 1.0 and row["epochs_run"] == 1
        runs = {r["model"]: r for r in result["runs"] if r["dataset"] == dataset}
        assert block["paired"]["dgenctr"]["auc"]["mean"] == pytest.approx(runs["dgenctr"]["test"]["auc"] - runs["dnn"]["test"]["auc"])
        config = json.loads((out / "runs" / dataset / "dgenctr-seed1" / "config.json").read_text())
        assert config["run"]["train"]["epochs"] == 1 and config["run"]["pretrain"]["epochs"] == 1
        assert config["run"]["max_rows"] == QUALITY.QUICK["max_rows"] and config["run"]["pretrain_mode"] == "full"
    assert result["summary"]["movielens100k"]["bayes_auc_test"] is None
    synth = result["summary"]["synthetic-mixed-300k"]
    assert synth["bayes_auc_test"] == meta["bayes_auc"]["test"]
    assert "bayes_gap_closed" in synth["paired"]["dgenctr"]
    text = (out / "quality.md").read_text()
    assert "#### movielens100k" in text and "#### synthetic-mixed-300k" in text and "DNN→Bayes gap closed" in text

    # --resume finds every run done and only rewrites the report, from the same cached data.
    again = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming: 4 run(s)" in again.stdout and "[" not in again.stdout.split("resuming")[1].split("####")[0]
    assert json.loads((out / "quality.json").read_text())["summary"] == result["summary"]
