"""The `ctr` command line: subcommands exist, errors are one clear line, serving stays torch-free."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ctr.cli import main

REPO = Path(__file__).resolve().parent.parent


def run_ctr(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ctr", *args], capture_output=True, text=True, cwd=REPO, timeout=300, **kw)


def test_help_lists_commands():
    out = run_ctr("--help")
    assert out.returncode == 0
    assert "data" in out.stdout


def test_synth_then_fit_spec(tmp_path, capsys):
    assert main(["data", "synth", "--out", str(tmp_path), "--rows", "3000", "--users", "100", "--items", "50", "--seed", "2"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["bayes_auc"]["test"] > 0.5
    spec_path = tmp_path / "spec.json"
    assert main(["data", "fit-spec", "--spec", "synthetic", "--data", str(tmp_path), "--out", str(spec_path)]) == 0
    spec = json.loads(spec_path.read_text())
    assert spec["fitted"] is True and len(spec["fields"]) == 12


def test_csv_format(tmp_path):
    assert main(["data", "synth", "--out", str(tmp_path), "--rows", "1000", "--users", "50", "--items", "20", "--format", "csv"]) == 0
    assert (tmp_path / "train.csv").exists() and (tmp_path / "users.csv").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["data", "fit-spec", "--spec", "no_such_spec", "--data", ".", "--out", "x.json"], "not found"),
        (["data", "fit-spec", "--spec", "synthetic", "--data", "/no/such/dir", "--out", "x.json"], "no such data file"),
    ],
)
def test_user_errors_are_one_clear_line(args, message, tmp_path):
    out = run_ctr(*args)
    assert out.returncode == 2
    assert message in out.stderr
    assert "Traceback" not in out.stderr


def test_missing_label_column_is_named(tmp_path):
    import pandas as pd

    pd.DataFrame({"user": ["a"], "item": ["b"]}).to_csv(tmp_path / "train.csv", index=False)
    out = run_ctr("data", "fit-spec", "--spec", "frappe_x1", "--data", str(tmp_path), "--out", str(tmp_path / "s.json"))
    assert out.returncode == 2 and "label column 'label'" in out.stderr


def test_spec_code_imports_without_torch():
    """The serving image has no torch; the spec, readers and CLI must not need it."""
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import model.spec, model.readers, model.synth, model.cli, ctr.cli\n"
        "print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr


def test_train_flags_left_out_take_the_config_defaults():
    """One number per setting: `ctr train` passes only the flags a user set, so TrainConfig and
    PretrainConfig hold each default once (the stage-1 length moved from 2 to 10 there alone)."""
    from dataclasses import replace

    from ctr.cli import build_parser
    from model.diffusion import PretrainConfig
    from model.train_cli import build_run_config
    from model.trainer import TrainConfig

    base = ["train", "--spec", "synthetic", "--data", "d", "--model", "dgenctr", "--out", "o"]
    default = build_run_config(build_parser().parse_args(base))
    assert default.pretrain == PretrainConfig() and default.pretrain.epochs == 10
    assert default.train == replace(TrainConfig(), batch_size=1024)  # dgenctr's batch; the rest as configured
    assert default.model == {}
    chosen = build_run_config(build_parser().parse_args([*base, "--pretrain-epochs", "3", "--tau", "0.2", "--lr", "0.01",
                                                         "--patience", "0", "--dropout", "0.1", "--d-model", "16"]))
    assert (chosen.pretrain.epochs, chosen.pretrain.tau, chosen.train.lr, chosen.train.patience) == (3, 0.2, 0.01, 0)
    assert chosen.model == {"dropout": 0.1, "d_model": 16}
