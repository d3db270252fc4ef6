"""Hyperparameter search on the validation split only (Optuna TPE), then one scoring on test.

  python benchmarks/search.py --dataset movielens100k --data DIR --models dnn,dgenctr --budget-min 10
  python benchmarks/search.py --dataset movielens100k --data DIR --models dnn,dgenctr --final
  python benchmarks/search.py --dataset synthetic --data DIR --models dnn,dgenctr --quick     # CI-sized

Why it is built this way:

* **A trial is a recipe file plus overrides.** It starts from the shipped recipe for the data
  set and model (`recipes/DATASET/MODEL.yaml`, else `recipes/synthetic/MODEL.yaml`) and runs
  `ctr train --config RECIPE --set KEY=VALUE ...` with the keys sampled from
  `recipes/search/MODEL.yml`. The best trial's recipe and overrides are written out as
  `MODEL/chosen.yaml`, which `ctr train --config` runs as is.
* **The same budget for every model on every data set, in CPU seconds.** Each trial is a child
  process; its cost is the CPU time the kernel charges it (user + system, `os.wait4`'s rusage:
  the per-child form of `getrusage(RUSAGE_CHILDREN)`). Wall time is not used because the
  machine is shared: another job slowing a trial down would shrink that model's search. A
  trial still running when its model's budget is spent is stopped (its CPU time is charged,
  its result discarded), so no model gets more than its budget plus one poll interval.
* **Trials never see the test split.** `ctr train` reads train/valid/test, so trials run on a
  data directory of links (`trial_data/`) in which `test` is the *validation* file: the real
  test file is never opened while searching. The search reads only the `valid` keys of a
  trial's metrics.json (and strips its stand-in `test` keys), the child's stdout (whose
  summary names `test`) is discarded, and the summary has no test figures.
* **Weak trials stop early.** The child logs JSON lines (`--log-format json`); every
  `epoch_end` line's `valid_auc` is reported to Optuna's median pruner, and a pruned trial's
  process is ended. DGenCTR's stage 1 has no valid AUC, so pruning acts in stage 2 only.
* **`--final`** scores each chosen config once on the test split, for seeds 1, 2 and 3, with
  the models paired by seed, and prints valid AUC of the chosen trial, test AUC / logloss /
  GAUC (mean +- std) and the paired DGenCTR - DNN difference.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from model import run_config as recipes  # noqa: E402
from model.readers import SUFFIXES, split_path  # noqa: E402

FRAPPE = REPO.parent / "shared" / "data" / "frappe_x1"
SPACE_DIR = REPO / "recipes" / "search"
MODELS = ("dnn", "deepfm", "dcnv2", "dgenctr")
FINAL_SEEDS = (1, 2, 3)
# TPE samples at random for its first trials; with budgets of ~10-30 trials per model, the
# default 10 would leave little room for the model-based part.
TPE_STARTUP_TRIALS = 5
# The median pruner compares a trial's valid AUC at an epoch with earlier trials' at the same
# epoch, from the 3rd complete trial on and never at epoch 1 (masked and averaged runs start slow).
PRUNER_STARTUP_TRIALS = 3
PRUNER_WARMUP_EPOCHS = 2
QUICK = {"max_rows": 3000, "max_epochs": 1, "max_pretrain_epochs": 1, "trials": 3}
POLL_S = 0.2


# --------------------------------------------------------------------------- search spaces


@dataclass
class Param:
    key: str  # a dotted recipe key: train.lr, model.d_model, field_mask_rate
    kind: str  # float | int | categorical
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list[Any] = field(default_factory=list)

    def suggest(self, trial: Any) -> Any:
        if self.kind == "categorical":
            return trial.suggest_categorical(self.key, self.choices)
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return trial.suggest_float(self.key, float(self.low), float(self.high), log=self.log, step=self.step)

    def capped(self, cap: int | None) -> "Param":
        """The same range with its top at `cap` (quick runs cap stage-1 epochs)."""
        if cap is None or self.kind != "int":
            return self
        high = min(int(self.high), cap)
        return Param(self.key, self.kind, min(int(self.low), high), high, self.log, self.step)


@dataclass
class SearchSpace:
    model: str
    path: Path
    fixed: dict[str, Any]
    params: list[Param]

    @classmethod
    def load(cls, model: str, space_dir: Path = SPACE_DIR) -> "SearchSpace":
        path = space_dir / f"{model}.yml"
        if not path.is_file():
            raise FileNotFoundError(f"no search space for '{model}': {path}")
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        unknown = set(raw) - {"fixed", "params"}
        if unknown:
            raise ValueError(f"{path}: unknown section(s) {sorted(unknown)} (valid: fixed, params)")
        params = []
        for key, spec in (raw.get("params") or {}).items():
            spec = dict(spec)
            kind = spec.pop("type", None)
            if kind not in ("float", "int", "categorical"):
                raise ValueError(f"{path}: {key}: type must be float, int or categorical, got {kind!r}")
            bad = set(spec) - {"low", "high", "log", "step", "choices"}
            if bad:
                raise ValueError(f"{path}: {key}: unknown field(s) {sorted(bad)}")
            if kind == "categorical" and not spec.get("choices"):
                raise ValueError(f"{path}: {key}: a categorical needs choices")
            if kind != "categorical" and (spec.get("low") is None or spec.get("high") is None):
                raise ValueError(f"{path}: {key}: a {kind} needs low and high")
            params.append(Param(key, kind, **{k: (float(v) if k in ("low", "high") else v) for k, v in spec.items()}))
        return cls(model, path, dict(raw.get("fixed") or {}), params)


# --------------------------------------------------------------------------- trial configs


def base_recipe(dataset: str, model: str) -> Path:
    path = recipes.default_recipe(dataset, model)
    if path is None:
        raise FileNotFoundError(f"no recipe for {model} on {dataset} (nor a generic one)")
    return path


def caps(args: argparse.Namespace, recipe: Mapping[str, Any]) -> dict[str, Any]:
    """Keys every trial of this search sets on top of the sample: the epoch and row caps."""
    out: dict[str, Any] = {}
    if args.max_epochs:
        out["train.epochs"] = min(int((recipe.get("train") or {}).get("epochs") or args.max_epochs), args.max_epochs)
    if args.max_rows:
        out["max_rows"] = args.max_rows
    return out


def trial_recipe(recipe_path: Path, dataset: str, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The recipe with the spec and the overrides applied, checked as `ctr train` checks it."""
    raw = recipes.load(recipe_path)
    recipes.assign(raw, "spec", dataset, where=str(recipe_path))
    for key, value in overrides.items():
        recipes.assign(raw, key, value, where=f"{recipe_path} --set {key}")
    recipes.to_run_config({**raw, "data": "."}, "-", where=f"{recipe_path} with the search's overrides")
    return raw


def _readable(value: Any) -> Any:
    """A sampled float to 4 significant digits: the run, its overrides and chosen.yaml then
    all carry the same short value (TPE's 17-digit samples carry no more information)."""
    return float(f"{value:.4g}") if isinstance(value, float) else value


def yaml_scalar(value: Any) -> str:
    """A value as `--set` reads it back (YAML): 1e-05 must be written 1.0e-05 to stay a float."""
    return yaml.safe_dump(value, default_flow_style=True).splitlines()[0]


def train_argv(config: Path, dataset: str, data: Path, seed: int, threads: int, out: Path,
               overrides: Mapping[str, Any] = {}) -> list[str]:
    argv = [sys.executable, "-m", "ctr", "--log-format", "json", "train", "--config", str(config), "--spec", dataset,
            "--data", str(data), "--seed", str(seed), "--threads", str(threads), "--no-progress", "--out", str(out)]
    for key, value in overrides.items():
        argv += ["--set", f"{key}={yaml_scalar(value)}"]
    return argv


def trial_data_dir(data: Path, out: Path) -> Path:
    """Links to train and valid, and `test` linked to the validation file: what a trial reads."""
    d = out / "trial_data"
    d.mkdir(parents=True, exist_ok=True)
    valid = split_path(data, "valid")
    for name, target in (("train", split_path(data, "train")), ("valid", valid), ("test", valid)):
        for suffix in SUFFIXES:
            (d / f"{name}{suffix}").unlink(missing_ok=True)
        (d / f"{name}{target.suffix}").symlink_to(target.resolve())
    (d / "README").write_text("Trials of benchmarks/search.py read this directory: 'test' is the validation split, "
                              "so no trial opens the real test file.\n", encoding="utf-8")
    return d


def read_valid(run_dir: Path) -> dict[str, Any]:
    """The valid figures of a trial run (metrics.json's `valid` and the per-epoch valid AUC),
    and nothing else. The stand-in `test` keys are removed from the file, so no later reader
    mistakes the validation split's numbers for test numbers."""
    path = run_dir / "metrics.json"
    metrics = json.loads(path.read_text(encoding="utf-8"))
    valid = {"valid": metrics["valid"],
             "history": [{k: row[k] for k in ("epoch", "stage", "valid_auc") if k in row} for row in metrics.get("history", [])],
             "train_seconds": metrics.get("train_seconds")}
    metrics.pop("test", None)
    if isinstance(metrics.get("calibrated"), dict):
        metrics["calibrated"].pop("test", None)
    metrics["search_note"] = "trial run: its test split was the validation file; test keys removed"
    path.write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    for heavy in ("model.safetensors", "pretrained.safetensors"):
        (run_dir / heavy).unlink(missing_ok=True)
    return valid


# --------------------------------------------------------------------------- child processes and CPU time


def proc_cpu_seconds(pid: int) -> float | None:
    """CPU seconds a running process has used so far (Linux /proc; None elsewhere or once gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # After the ")" that ends the command name: state is field 3, utime..cstime are fields 14..17.
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


@dataclass
class ChildResult:
    returncode: int
    cpu_s: float  # user + system seconds, as the kernel charged the reaped child
    stopped: str | None  # "pruned" | "budget" | None
    reports: list[tuple[int, float]]
    tail: list[str]


def run_child(argv: Sequence[str], cpu_limit_s: float, on_report: Callable[[int, float], bool] | None = None,
              poll_s: float = POLL_S) -> ChildResult:
    """Run one trial process, stop it when `on_report` says prune or its CPU time reaches
    `cpu_limit_s`, and return the CPU time it was charged.

    The child is reaped with `os.wait4`, whose rusage is that one child's (and its reaped
    descendants') CPU time, so searches for several models can run side by side without their
    charges mixing, as a process-wide getrusage(RUSAGE_CHILDREN) difference would.
    """
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(list(argv), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=str(REPO), start_new_session=True)
    lines: queue.Queue[tuple[int, float]] = queue.Queue()
    tail: list[str] = []

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            tail.append(line.rstrip())
            del tail[:-40]
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and rec.get("event") == "epoch_end" and rec.get("valid_auc") is not None:
                lines.put((int(rec["epoch"]), float(rec["valid_auc"])))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    stopped: str | None = None
    reports: list[tuple[int, float]] = []
    status, usage = 0, None
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        try:
            while True:
                epoch, auc = lines.get_nowait()
                reports.append((epoch, auc))
                if stopped is None and on_report is not None and on_report(epoch, auc):
                    stopped = "pruned"
        except queue.Empty:
            pass
        used = proc_cpu_seconds(proc.pid)
        if stopped is None and used is not None and used >= cpu_limit_s:
            stopped = "budget"
        if stopped is not None:
            os.killpg(proc.pid, signal.SIGKILL)
        time.sleep(poll_s)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here; Popen must not wait again
    reader.join(timeout=10)
    while not lines.empty():
        reports.append(lines.get_nowait())
    return ChildResult(proc.returncode, usage.ru_utime + usage.ru_stime, stopped, reports, tail)


# --------------------------------------------------------------------------- one model's search


def _optuna():
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def study_for(model_dir: Path, dataset: str, model: str, seed: int):
    optuna = _optuna()
    storage = f"sqlite:///{(model_dir / 'study.db').resolve()}"
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=TPE_STARTUP_TRIALS)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=PRUNER_STARTUP_TRIALS, n_warmup_steps=PRUNER_WARMUP_EPOCHS)
    return optuna.create_study(study_name=f"{dataset}-{model}-seed{seed}", storage=storage, direction="maximize",
                               sampler=sampler, pruner=pruner, load_if_exists=True)


def spent_cpu(study) -> float:
    """CPU seconds charged to a study so far (a resumed search keeps its earlier spending)."""
    return sum(float(t.user_attrs.get("cpu_s", 0.0)) for t in study.trials)


def search_model(model: str, args: argparse.Namespace, trial_data: Path, log: Callable[[str], None]) -> dict[str, Any]:
    optuna = _optuna()
    space = SearchSpace.load(model, args.space_dir)
    recipe_path = base_recipe(args.dataset, model)
    fixed_caps = {**space.fixed, **caps(args, recipes.load(recipe_path))}
    params = [p.capped(args.max_pretrain_epochs if p.key == "pretrain.epochs" else None) for p in space.params]
    # Every range's ends must make a valid run before any CPU is spent on one.
    for pick in (0, -1):
        probe = {p.key: (p.choices[pick] if p.kind == "categorical" else (p.low if pick == 0 else p.high)) for p in params}
        trial_recipe(recipe_path, args.dataset, {**probe, **fixed_caps})
    model_dir = args.out / model
    (model_dir / "trials").mkdir(parents=True, exist_ok=True)
    study = study_for(model_dir, args.dataset, model, args.seed)
    budget_s = args.budget_min * 60.0
    failures = 0
    while True:
        spent = spent_cpu(study)
        done = len([t for t in study.trials if t.state.is_finished()])
        if spent >= budget_s or (args.trials and done >= args.trials):
            break
        trial = study.ask()
        overrides = {p.key: _readable(p.suggest(trial)) for p in params}
        overrides.update(fixed_caps)
        run_dir = model_dir / "trials" / f"{trial.number:04d}"
        argv = train_argv(recipe_path, args.dataset, trial_data, args.seed, args.threads, run_dir, overrides)

        def on_report(epoch: int, auc: float, trial=trial) -> bool:
            trial.report(auc, step=epoch)
            return trial.should_prune()

        res = run_child(argv, budget_s - spent, on_report)
        trial.set_user_attr("cpu_s", res.cpu_s)
        trial.set_user_attr("overrides", {k: v for k, v in overrides.items()})
        trial.set_user_attr("recipe", _shown(recipe_path))
        if res.stopped == "pruned":
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            outcome = f"pruned at epoch {res.reports[-1][0]}"
        elif res.stopped == "budget":
            trial.set_user_attr("stopped", "budget spent")
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            outcome = "stopped: budget spent"
        elif res.returncode != 0:
            failures += 1
            trial.set_user_attr("error", "\n".join(res.tail[-5:]))
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            outcome = f"failed (exit {res.returncode})"
            if failures >= 3 and not study.best_trials:
                raise RuntimeError(f"{model}: three trials failed and none completed; last output:\n" + "\n".join(res.tail))
        else:
            valid = read_valid(run_dir)
            trial.set_user_attr("valid", valid["valid"])
            trial.set_user_attr("valid_history", valid["history"])
            study.tell(trial, valid["valid"]["auc"])
            outcome = f"valid AUC {valid['valid']['auc']:.5f}"
        log(f"{model} trial {trial.number}: {outcome}, {res.cpu_s:.1f} CPU-s "
            f"({spent_cpu(study):.0f}/{budget_s:.0f} spent)")
    return summarise_model(study, model, recipe_path, fixed_caps, budget_s, model_dir, args)


def summarise_model(study, model: str, recipe_path: Path, fixed_caps: Mapping[str, Any], budget_s: float,
                    model_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    optuna = _optuna()
    states = [t.state for t in study.trials]
    counts = {s.name.lower(): states.count(s) for s in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED,
                                                         optuna.trial.TrialState.FAIL)}
    out: dict[str, Any] = {"model": model, "recipe": str(recipe_path), "budget_cpu_s": budget_s,
                           "spent_cpu_s": spent_cpu(study), "trials": counts, "study": str(model_dir / "study.db")}
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        out["chosen"] = None
        return out
    best = study.best_trial
    overrides = dict(best.user_attrs["overrides"])
    chosen = model_dir / "chosen.yaml"
    write_chosen(chosen, recipe_path, args, overrides, best, out)
    out.update({"chosen": str(chosen), "best_trial": best.number, "valid_auc": best.value,
                "valid": best.user_attrs.get("valid"), "overrides": overrides})
    return out


def _shown(path: Path) -> str:
    """A path as the docs write it: relative to the repository when inside it."""
    path = path.resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def write_chosen(path: Path, recipe_path: Path, args: argparse.Namespace, overrides: Mapping[str, Any], best,
                 summary: Mapping[str, Any]) -> None:
    raw = trial_recipe(recipe_path, args.dataset, overrides)
    header = [
        f"# {summary['model']} on {args.dataset}: chosen by benchmarks/search.py on the validation split only.",
        f"#   Optuna TPE, seed {args.seed}, budget {summary['budget_cpu_s'] / 60:g} CPU-minutes "
        f"({summary['spent_cpu_s'] / 60:.1f} spent), trials {summary['trials']}.",
        f"#   Best trial {best.number}: valid AUC {best.value:.5f}. Base recipe {_shown(recipe_path)};",
        "#   overrides: " + ", ".join(f"{k}={yaml_scalar(v)}" for k, v in overrides.items()),
        f"#   ctr train --config {_shown(path)} --data DIR --seed S --out RUN",
    ]
    path.write_text("\n".join(header) + "\n" + yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")


# --------------------------------------------------------------------------- final scoring on test


def final(args: argparse.Namespace, summary: Mapping[str, Any], log: Callable[[str], None]) -> dict[str, Any]:
    """Each chosen config trained once per seed on the real splits and scored on test."""
    for model in args.models:
        info = summary["models"].get(model)
        if not info or not info.get("chosen"):
            raise SystemExit(f"no chosen config for {model} in {args.out / 'summary.json'}: run the search first")

    def one(model: str, seed: int) -> dict[str, Any]:
        run_dir = args.out / "final" / model / f"seed{seed}"
        argv = train_argv(Path(summary["models"][model]["chosen"]), args.dataset, args.data, seed, args.threads, run_dir)
        res = run_child(argv, float("inf"))
        if res.returncode != 0:
            raise RuntimeError(f"final run {model} seed {seed} failed:\n" + "\n".join(res.tail))
        metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
        log(f"final {model} seed {seed}: test AUC {metrics['test']['auc']:.5f}, {res.cpu_s:.0f} CPU-s")
        return {"test": metrics["test"], "valid": metrics["valid"], "cpu_s": res.cpu_s}

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = {(m, s): pool.submit(one, m, s) for m in args.models for s in args.final_seeds}
        runs: dict[str, dict[int, dict[str, Any]]] = {m: {s: futures[m, s].result() for s in args.final_seeds}
                                                      for m in args.models}
    table = final_table(runs, summary)
    return {"dataset": args.dataset, "seeds": list(args.final_seeds), "runs": runs, "table": table}


def _ms(xs: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def final_table(runs: Mapping[str, Mapping[int, Mapping[str, Any]]], summary: Mapping[str, Any]) -> dict[str, Any]:
    rows = {}
    for model, by_seed in runs.items():
        seeds = sorted(by_seed)
        row = {"valid_auc_chosen_trial": summary["models"][model]["valid_auc"],
               "budget_cpu_min": summary["models"][model]["budget_cpu_s"] / 60}
        for metric in ("auc", "logloss", "gauc"):
            vals = [by_seed[s]["test"].get(metric) for s in seeds]
            if all(v is not None for v in vals):
                row[f"test_{metric}"] = _ms(vals)
        row["cpu_s_per_run"] = statistics.fmean(by_seed[s]["cpu_s"] for s in seeds)
        rows[model] = row
    paired = {}
    if "dnn" in runs:
        for model in runs:
            if model == "dnn":
                continue
            seeds = sorted(set(runs[model]) & set(runs["dnn"]))
            diffs = [runs[model][s]["test"]["auc"] - runs["dnn"][s]["test"]["auc"] for s in seeds]
            paired[f"{model} - dnn"] = {"seeds": seeds, "test_auc_diff": _ms(diffs), "per_seed": diffs}
    return {"models": rows, "paired": paired}


def format_table(result: Mapping[str, Any]) -> str:
    t = result["table"]
    lines = [f"Test split, seeds {', '.join(map(str, result['seeds']))} (configs chosen on validation; "
             f"budget {next(iter(t['models'].values()))['budget_cpu_min']:g} CPU-min per model)", "",
             "| model | valid AUC (chosen trial) | test AUC | test logloss | test GAUC | CPU-s per run |",
             "|---|---:|---:|---:|---:|---:|"]

    def pm(x: Any) -> str:
        return f"{x[0]:.5f} ± {x[1]:.5f}" if x else "–"

    for model, row in t["models"].items():
        lines.append(f"| {model} | {row['valid_auc_chosen_trial']:.5f} | {pm(row.get('test_auc'))} | "
                     f"{pm(row.get('test_logloss'))} | {pm(row.get('test_gauc'))} | {row['cpu_s_per_run']:.0f} |")
    for name, p in t["paired"].items():
        lines.append("")
        lines.append(f"paired {name} test AUC: {p['test_auc_diff'][0]:+.5f} ± {p['test_auc_diff'][1]:.5f} "
                     f"(per seed: {', '.join(f'{d:+.5f}' for d in p['per_seed'])})")
    return "\n".join(lines)


# --------------------------------------------------------------------------- command line


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, help="the spec / data set name: frappe_x1, movielens100k, synthetic, synthetic-*")
    p.add_argument("--data", type=Path, default=None, help="its data directory (default for frappe_x1: ../shared/data/frappe_x1)")
    p.add_argument("--models", default="dnn,dgenctr", help=f"comma-separated, from {', '.join(MODELS)}")
    p.add_argument("--budget-min", type=float, default=20.0, help="CPU-minutes of trial processes per model (the same for every model)")
    p.add_argument("--seed", type=int, default=1, help="the trials' training seed and the TPE sampler's seed")
    p.add_argument("--trials", type=int, default=0, help="also stop a model's search after this many trials (0: budget only)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per trial (CPU-seconds are charged over all of them)")
    p.add_argument("--jobs", type=int, default=1,
                   help="models searched side by side (each charged its own CPU time); with --final, runs side by side")
    p.add_argument("--max-epochs", type=int, default=0, help="cap every trial's train.epochs (0: the recipe's)")
    p.add_argument("--max-pretrain-epochs", type=int, default=None, help="cap the sampled DGenCTR stage-1 epochs")
    p.add_argument("--max-rows", type=int, default=0, help="cap every split's rows (smoke runs)")
    p.add_argument("--quick", action="store_true",
                   help=f"CI-sized: {QUICK['trials']} trials per model, 1 epoch, 1 stage-1 epoch, {QUICK['max_rows']} rows")
    p.add_argument("--out", type=Path, default=None, help="default benchmarks/out/search/DATASET-seedN")
    p.add_argument("--space-dir", type=Path, default=SPACE_DIR, help="where MODEL.yml search spaces live")
    p.add_argument("--final", action="store_true", help="score the chosen configs on test (after the search)")
    p.add_argument("--final-seeds", default=",".join(map(str, FINAL_SEEDS)), help="seeds of the final scoring, paired across models")
    args = p.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        p.error(f"unknown model(s) {unknown} (choose from {', '.join(MODELS)})")
    args.final_seeds = [int(s) for s in str(args.final_seeds).split(",") if s.strip()]
    if args.data is None:
        if args.dataset != "frappe_x1":
            p.error("--data DIR is needed for every data set but frappe_x1")
        args.data = FRAPPE
    if args.quick:
        args.trials = args.trials or QUICK["trials"]
        args.max_epochs = args.max_epochs or QUICK["max_epochs"]
        args.max_rows = args.max_rows or QUICK["max_rows"]
        args.max_pretrain_epochs = args.max_pretrain_epochs or QUICK["max_pretrain_epochs"]
    args.out = args.out or REPO / "benchmarks" / "out" / "search" / f"{args.dataset}-seed{args.seed}"
    return args


def _assert_no_test(obj: Any, where: str = "summary") -> None:
    """The search's summary carries validation figures only: refuse to write one naming test."""
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            if "test" in str(k).lower():
                raise AssertionError(f"{where}.{k}: the search summary must not carry test figures")
            _assert_no_test(v, f"{where}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            _assert_no_test(v, f"{where}[{i}]")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    lock = threading.Lock()

    def log(msg: str) -> None:
        with lock:
            print(f"[search {time.strftime('%H:%M:%S')}] {msg}", flush=True)

    summary_path = args.out / "summary.json"
    if args.final:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
        result = final(args, summary, log)
        (args.out / "final.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        text = format_table(result)
        (args.out / "final.md").write_text(text + "\n", encoding="utf-8")
        print(text)
        return 0

    trial_data = trial_data_dir(args.data, args.out)
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = {m: pool.submit(search_model, m, args, trial_data, log) for m in args.models}
        results = {m: f.result() for m, f in futures.items()}
    previous = json.loads(summary_path.read_text(encoding="utf-8"))["models"] if summary_path.exists() else {}
    summary = {"dataset": args.dataset, "data": str(args.data), "seed": args.seed, "budget_cpu_min": args.budget_min,
               "budget_unit": "CPU seconds (user + system) of the trial processes, the same for every model",
               "scored_on": "valid", "models": {**previous, **results}}
    _assert_no_test(summary)
    summary_path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    for m, r in results.items():
        best = f"valid AUC {r['valid_auc']:.5f} (trial {r['best_trial']})" if r.get("chosen") else "no complete trial"
        log(f"{m}: {best}; {r['spent_cpu_s'] / 60:.1f}/{r['budget_cpu_s'] / 60:g} CPU-min, trials {r['trials']}; {r.get('chosen')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
