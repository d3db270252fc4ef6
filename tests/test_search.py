"""benchmarks/search.py: a search scored on validation only, under one CPU budget per model.

The end-to-end tests run real `ctr train` trials (tiny synthetic data, one epoch) as the search
runs them, with the data set's test file replaced by bytes no reader accepts: a trial or the
search itself that opened it would fail. The CPU accounting is checked on real child processes.
"""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

import pytest
import yaml

from tests.testing import load_script

REPO = Path(__file__).resolve().parents[1]
search = load_script(REPO / "benchmarks" / "search.py", "search_benchmark")

from model import run_config as recipes  # noqa: E402

# Paths whose opening by this process is recorded (audit hooks cannot be removed, so one hook
# serves every test and only watches the paths a test puts here).
_WATCHED: set[str] = set()
_OPENED: list[str] = []


def _audit(event: str, args: tuple) -> None:
    if event == "open" and _WATCHED and isinstance(args[0], (str, bytes, Path)):
        path = str(Path(args[0].decode() if isinstance(args[0], bytes) else args[0]).resolve())
        if path in _WATCHED:
            _OPENED.append(path)


sys.addaudithook(_audit)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from model.synth import SynthConfig, synthesize

    d = tmp_path_factory.mktemp("synth")
    synthesize(SynthConfig(rows=4000, users=200, items=100, brands=50, seed=3), d)
    return d


def _poison_test_split(data: Path) -> bytes:
    """Replace the test file by bytes no Parquet reader accepts; return the real ones."""
    path = data / "test.parquet"
    real = path.read_bytes()
    path.write_bytes(b"not a parquet file: the search must never open the test split\n")
    return real


def _study(out: Path, model: str):
    import optuna

    return optuna.load_study(study_name=f"synthetic-{model}-seed1", storage=f"sqlite:///{out / model / 'study.db'}")


@pytest.mark.slow
def test_quick_search_scores_on_valid_only_then_final_scores_test(data, tmp_path, capsys):
    out = tmp_path / "search"
    test_file = str((data / "test.parquet").resolve())
    real = _poison_test_split(data)
    _WATCHED.add(test_file)
    try:
        rc = search.main(["--dataset", "synthetic", "--data", str(data), "--models", "dnn,dgenctr", "--quick",
                          "--trials", "2", "--max-rows", "2000", "--budget-min", "20", "--out", str(out)])
    finally:
        _WATCHED.discard(test_file)
        (data / "test.parquet").write_bytes(real)
    assert rc == 0
    assert _OPENED == []  # the search process never opened the test file
    summary = json.loads((out / "summary.json").read_text())
    assert summary["scored_on"] == "valid"
    search._assert_no_test(summary)  # no key names test figures
    # The trials' `test` split is the validation file: the poisoned test file was never a trial's input.
    assert (out / "trial_data" / "test.parquet").resolve() == (data / "valid.parquet").resolve()

    budgets = {m: summary["models"][m]["budget_cpu_s"] for m in ("dnn", "dgenctr")}
    assert set(budgets.values()) == {20 * 60.0}  # one budget for every model
    for model in ("dnn", "dgenctr"):
        info = summary["models"][model]
        assert info["trials"] == {"complete": 2, "pruned": 0, "fail": 0}, info
        study = _study(out, model)
        assert info["spent_cpu_s"] == pytest.approx(sum(t.user_attrs["cpu_s"] for t in study.trials))
        assert all(t.user_attrs["cpu_s"] > 0 for t in study.trials)
        # Each epoch's valid AUC reached Optuna from the trial's log (what the pruner acts on).
        assert all(t.intermediate_values for t in study.trials)
        assert info["valid_auc"] == study.best_value
        for trial_dir in (out / model / "trials").iterdir():
            metrics = json.loads((trial_dir / "metrics.json").read_text())
            assert "test" not in metrics and "test" not in metrics.get("calibrated", {})
        # chosen.yaml is the base recipe plus the best trial's overrides, a recipe `ctr train --config` accepts.
        chosen = recipes.load(info["chosen"])
        base = recipes.load(recipes.default_recipe("synthetic", model))
        flat = {f"{k}.{sub}" if isinstance(v, dict) else k: sv
                for k, v in chosen.items() for sub, sv in (v.items() if isinstance(v, dict) else [(None, v)])}
        for key, value in info["overrides"].items():
            assert flat[key] == value, key
        assert chosen["model_type"] == base["model_type"] == model
        cfg = recipes.to_run_config({**chosen, "data": str(data)}, str(tmp_path / "x"))
        assert cfg.max_rows == 2000 and cfg.train.epochs == 1
    capsys.readouterr()

    rc = search.main(["--dataset", "synthetic", "--data", str(data), "--models", "dnn,dgenctr", "--out", str(out),
                      "--final", "--final-seeds", "1,2"])
    assert rc == 0
    table = capsys.readouterr().out
    assert "paired dgenctr - dnn test AUC" in table and "| dnn |" in table and "| dgenctr |" in table
    result = json.loads((out / "final.json").read_text())
    for model in ("dnn", "dgenctr"):
        assert sorted(result["runs"][model]) == ["1", "2"]
        assert result["table"]["models"][model]["valid_auc_chosen_trial"] == summary["models"][model]["valid_auc"]
    paired = result["table"]["paired"]["dgenctr - dnn"]
    per_seed = [result["runs"]["dgenctr"][s]["test"]["auc"] - result["runs"]["dnn"][s]["test"]["auc"] for s in ("1", "2")]
    assert paired["per_seed"] == pytest.approx(per_seed)


@pytest.mark.slow
def test_search_stops_each_model_at_the_same_cpu_budget(data, tmp_path):
    """A 3 CPU-second budget is less than one trial (importing torch alone costs about that):
    each model's only trial is stopped at the budget and charged, and no config is chosen."""
    out = tmp_path / "search"
    rc = search.main(["--dataset", "synthetic", "--data", str(data), "--models", "dnn,dgenctr", "--quick",
                      "--budget-min", "0.05", "--out", str(out)])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    for model in ("dnn", "dgenctr"):
        info = summary["models"][model]
        assert info["budget_cpu_s"] == pytest.approx(3.0)
        assert info["chosen"] is None and info["trials"]["fail"] == 1
        # Charged at least the budget, and at most one poll interval of two threads' CPU time past it.
        assert 3.0 <= info["spent_cpu_s"] <= 3.0 + 1.0
        assert _study(out, model).trials[0].user_attrs["stopped"] == "budget spent"
    with pytest.raises(SystemExit, match="no chosen config for dnn"):
        search.main(["--dataset", "synthetic", "--data", str(data), "--models", "dnn", "--out", str(out), "--final"])


BURN = "import time\nt = time.process_time()\nwhile time.process_time() - t < {s}: pass\n"


def test_each_trial_process_is_charged_its_own_cpu_time():
    """Two children side by side are charged their own CPU time, not each other's (wait4's
    per-child rusage), so models searched in parallel keep separate, equal budgets."""
    results: dict[float, search.ChildResult] = {}

    def run(seconds: float) -> None:
        results[seconds] = search.run_child([sys.executable, "-c", BURN.format(s=seconds)], float("inf"))

    threads = [threading.Thread(target=run, args=(s,)) for s in (0.3, 1.5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    small, big = results[0.3], results[1.5]
    assert small.returncode == 0 and big.returncode == 0 and small.stopped is None
    assert 0.3 <= small.cpu_s < 1.5  # the interpreter's start-up on top of its own loop, not the other's
    assert big.cpu_s >= 1.5


def test_a_trial_past_its_cpu_limit_is_stopped_and_charged():
    res = search.run_child([sys.executable, "-c", "while True: pass"], cpu_limit_s=1.0)
    assert res.stopped == "budget" and res.returncode != 0
    assert 1.0 <= res.cpu_s <= 1.0 + 1.0


def test_a_pruned_trial_is_stopped_after_the_epoch_that_pruned_it():
    """The search reads each epoch's valid AUC from the trial's JSON log lines (`epoch_end`)."""
    child = ("import json, sys, time\n"
             "for e in range(1, 50):\n"
             "    print(json.dumps({'event': 'epoch_end', 'epoch': e, 'stage': 'train', 'valid_auc': 0.5 + e / 100}),"
             " file=sys.stderr, flush=True)\n"
             "    time.sleep(0.2)\n")
    seen = []

    def on_report(epoch: int, auc: float) -> bool:
        seen.append((epoch, auc))
        return epoch >= 3

    res = search.run_child([sys.executable, "-c", child], float("inf"), on_report)
    assert res.stopped == "pruned" and res.returncode != 0
    assert seen[:3] == [(1, 0.51), (2, 0.52), (3, 0.53)]
    assert len(res.reports) < 49  # ended, not run to its last epoch


@pytest.mark.parametrize("model", search.MODELS)
@pytest.mark.parametrize("dataset", ["synthetic", "frappe_x1", "movielens100k"])
def test_search_space_ends_make_valid_runs_of_the_shipped_recipe(model, dataset):
    space = search.SearchSpace.load(model)
    keys = {p.key for p in space.params}
    assert {"train.lr", "train.batch_size", "train.embedding_l2", "field_mask_rate", "train.ema_epochs"} <= keys
    assert keys & {"model.embedding_dim", "model.d_model"}
    if model == "dgenctr":
        assert {"pretrain.epochs", "transfer_keep", "aux_weight", "model.layers"} <= keys
    recipe = search.base_recipe(dataset, model)
    for pick in (0, -1):
        probe = {p.key: (p.choices[pick] if p.kind == "categorical" else (p.low if pick == 0 else p.high)) for p in space.params}
        raw = search.trial_recipe(recipe, dataset, {**probe, **space.fixed})
        assert raw["spec"] == dataset


def test_search_spaces_are_not_run_recipes():
    """`ctr train --config NAME` and the recipe tests walk recipes/**/*.yaml; a search space is not one."""
    assert not [n for n in recipes.shipped_recipes() if n.startswith("search/")]
    assert sorted(p.stem for p in search.SPACE_DIR.glob("*.yml")) == sorted(search.MODELS)


def test_a_misspelt_search_space_is_refused(tmp_path):
    (tmp_path / "dnn.yml").write_text(yaml.safe_dump({"params": {"train.lr": {"type": "float", "lo": 1e-4, "high": 1e-2}}}))
    with pytest.raises(ValueError, match="unknown field"):
        search.SearchSpace.load("dnn", tmp_path)
    (tmp_path / "dnn.yml").write_text(yaml.safe_dump({"params": {"train.lrr": {"type": "float", "low": 1e-4, "high": 1e-2}}}))
    space = search.SearchSpace.load("dnn", tmp_path)
    with pytest.raises(ValueError, match="unknown key 'train.lrr'"):
        search.trial_recipe(search.base_recipe("synthetic", "dnn"), "synthetic", {space.params[0].key: 1e-3})
