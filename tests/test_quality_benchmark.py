"""benchmarks/quality.py: every variant is a shipped recipe file (what `ctr train --config` runs), and it runs end to end."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from ctr.cli import build_parser
from model import run_config as recipes
from model.networks import model_config
from model.train_cli import build_run_config

REPO = Path(__file__).resolve().parents[1]


def _quality_module():
    spec = importlib.util.spec_from_file_location("quality_benchmark", REPO / "benchmarks" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


QUALITY = _quality_module()
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
