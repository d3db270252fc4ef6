"""MATT benchmark: plain vs test-time paths on trained runs, paired by seed, with the ablation grid.

For every run of a quality benchmark (benchmarks/quality.py --datasets ...) it exports a
package (`ctr export`, kept when it exists), puts test-time statistics into it (the run's own,
else counted over the run's train split; kept when present), and scores it with
`testtime.evaluate.evaluate_package`, the `ctr evaluate` path, so every figure is what the
service would serve:

- valid split, the ablation grid, every other setting at TestTimeConfig's defaults: plain;
  M in {1, 2, 4, 8, 16} (trigger all); orders [1] / [1, 2] / [1, 2, 3] (M=8); heavy-hitter
  summary on / off (M=8, upper and lower frequency bounds); uniform paths against confidence-guided paths at M=4 and M=8;
  trigger all against uncertain (the default logit band) at M=4 and M=8.
- test split, each configuration once: plain, the shipped defaults (M=8, trigger all) and the
  selective trigger (uncertain, band 3.0) at M=8 and M=4. These were fixed before any test
  score was seen: they were chosen on Frappe_x1's valid split (docs/test-time.md §6), so the
  test figures of other data sets are an out-of-sample check of those choices.

    python benchmarks/test_time.py benchmarks/out/quality                  # every run of that output
    python benchmarks/test_time.py OUT1 OUT2 --datasets frappe_x1,movielens100k --models dnn,dcnv2 --seeds 3
    python benchmarks/test_time.py --runs runs/dnn-1 runs/dnn-2 --out tt   # runs named directly
    python benchmarks/quality.py --datasets ... --test-time matt           # the same, after training

Output in --out (default: the first quality output's test_time/): test_time.json,
test_time.md, test_time_partial.json after every evaluation (`--resume` skips those it holds)
and the packages (models/). Progress lines go to stderr. Identical configurations (M=8 "all"
is in four groups of the grid) are scored once per run and split.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from fnmatch import fnmatch
from pathlib import Path
from typing import Any, NamedTuple

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PARTIAL = "test_time_partial.json"
# --quick (tests, CI): splits capped, narrow sketches; the grid itself is the full one.
QUICK = {"max_rows": 2000, "width_log2": 12}


class Setting(NamedTuple):
    """One row of the grid: the ablation it belongs to, its label and its TestTimeConfig keys
    (None: plain scoring)."""

    group: str
    label: str
    config: dict[str, Any] | None


PLAIN = Setting("plain", "plain", None)
VALID_GRID: list[Setting] = [
    PLAIN,
    *[Setting("paths (trigger all)", f"M={m}", {"paths": m, "trigger": "all"}) for m in (1, 2, 4, 8, 16)],
    *[Setting("orders (M=8, all)", f"orders {o}", {"paths": 8, "trigger": "all", "orders": o})
      for o in ([1], [1, 2], [1, 2, 3])],
    # With the default upper-bound frequencies and a summary that lost keys, the heap cannot
    # change anything (a tracked key's upper bound is the sketch's estimate), so the heap is
    # also ablated on the lower bounds, where it gives exact counts to the frequent keys.
    *[Setting("heavy hitters (M=8, all)", f"heap {'on' if h else 'off'}{', lower bounds' if f == 'lower' else ''}",
              {"paths": 8, "trigger": "all", "heavy_hitters": h, **({"frequency": f} if f == "lower" else {})})
      for f in ("upper", "lower") for h in (True, False)],
    *[Setting("sampling (all)", f"{s} M={m}", {"paths": m, "trigger": "all", "sampling": s})
      for m in (4, 8) for s in ("confidence", "uniform")],
    *[Setting("trigger", f"{t} M={m}", {"paths": m, "trigger": t}) for m in (4, 8) for t in ("all", "uncertain")],
]
# Fixed in advance (Frappe_x1 valid, docs/test-time.md §6); "default" is TestTimeConfig() itself.
TEST_CONFIGS: list[Setting] = [
    PLAIN,
    Setting("test", "default (M=8, all)", {}),
    Setting("test", "uncertain (M=8, band 3)", {"trigger": "uncertain"}),
    Setting("test", "uncertain (M=4, band 3)", {"trigger": "uncertain", "paths": 4}),
]
FULL, SELECTIVE = TEST_CONFIGS[1].label, (TEST_CONFIGS[2].label, TEST_CONFIGS[3].label)


class Run(NamedTuple):
    dataset: str
    model: str
    seed: int
    run_dir: Path
    data_dir: Path


# ---------------------------------------------------------------------- inputs
def runs_of_quality_dir(out: Path) -> list[Run]:
    """The finished runs a quality benchmark output holds (results_partial.json names them)."""
    partial = out / "results_partial.json"
    if not partial.is_file():
        raise FileNotFoundError(f"{out} has no results_partial.json (is it a benchmarks/quality.py --datasets output?)")
    datasets = json.loads((out / "datasets.json").read_text()) if (out / "datasets.json").is_file() else {}
    found = []
    for r in json.loads(partial.read_text()):
        if "dataset" not in r:
            raise ValueError(f"{partial} is a single-data-set benchmark output; name its runs with --runs")
        run_dir = out / "runs" / r["dataset"] / f"{r['model']}-seed{r['seed']}"
        data = (datasets.get(r["dataset"]) or {}).get("dir") or _run_data(run_dir)
        if data is None:
            raise FileNotFoundError(f"no data directory known for {run_dir}")
        found.append(Run(r["dataset"], r["model"], int(r["seed"]), run_dir, Path(data)))
    return found


def run_of_dir(run_dir: Path) -> Run:
    """A run directory named directly: data set = its data directory's name."""
    cfg = json.loads((run_dir / "config.json").read_text())
    data = _run_data(run_dir)
    if data is None:
        raise FileNotFoundError(f"{run_dir}/config.json names no data directory that exists")
    seed = (cfg.get("run") or {}).get("seed", (cfg.get("train") or {}).get("seed"))
    model = str(cfg.get("variant") or cfg.get("model_type"))
    return Run(Path(data).name, model, int(seed if seed is not None else 0), run_dir, Path(data))


def _run_data(run_dir: Path) -> str | None:
    from testtime.cli import _run_data as run_data

    return run_data(str(run_dir))


def select(runs: list[Run], datasets: str | None, models: str | None, seeds: list[int] | None) -> list[Run]:
    pats = [p.strip() for p in datasets.split(",") if p.strip()] if datasets else None
    names = {m.strip() for m in models.split(",") if m.strip()} if models else None
    out = [r for r in runs if (pats is None or any(fnmatch(r.dataset, p) for p in pats))
           and (names is None or r.model in names) and (seeds is None or r.seed in seeds)]
    return list(dict.fromkeys(out))


# ---------------------------------------------------------------------- package + statistics
def package_for(run: Run, repo: Path, quick: bool) -> tuple[Path, dict[str, Any]]:
    """The run's package in `repo` (exported when absent) with statistics in it (added when absent)."""
    from export.cli import attach_stats
    from export.package import latest_version, package_path
    from testtime.stats import StatsConfig

    name = f"{run.dataset}-{run.model}-seed{run.seed}"
    info: dict[str, Any] = {}
    version = latest_version(repo, name)
    if version is None:
        from export.onnx_export import export_run

        t0 = time.perf_counter()
        pkg = export_run(run.run_dir, repo, name).path
        info["export_seconds"] = round(time.perf_counter() - t0, 2)
    else:
        pkg = package_path(repo, name, version)
    t0 = time.perf_counter()
    cfg = StatsConfig(width_log2=QUICK["width_log2"]) if quick else None
    info["stats"] = attach_stats(pkg, run.run_dir, "build", data=run.data_dir, config=cfg)
    info["stats_seconds"] = round(time.perf_counter() - t0, 2)
    return pkg, info


# ---------------------------------------------------------------------- evaluation
def config_id(setting: Setting) -> str:
    """Same id for the same effective configuration, so a setting in several groups is scored once."""
    if setting.config is None:
        return "plain"
    from testtime.matt import TestTimeConfig

    cfg = TestTimeConfig(**setting.config)
    return json.dumps(cfg.model_dump(), sort_keys=True) if cfg.active else "plain"


def evaluate(pkg: Path, run: Run, split: str, setting: Setting, threads: int | None, max_rows: int | None) -> dict[str, Any]:
    from testtime.evaluate import evaluate_package
    from testtime.matt import TestTimeConfig

    cfg = TestTimeConfig(**setting.config) if setting.config is not None else None
    t0, c0 = time.perf_counter(), time.process_time()
    res = evaluate_package(pkg, run.data_dir, split, cfg, threads=threads, max_rows=max_rows)
    keep = ("rows", "auc", "logloss", "gauc", "rows_per_second", "model_rows", "model_rows_per_row",
            "share_with_extra_paths", "test_time")
    return {k: res.get(k) for k in keep} | {"seconds": round(time.perf_counter() - t0, 3),
                                           "cpu_seconds": round(time.process_time() - c0, 3)}


def record_key(r: dict[str, Any]) -> tuple:
    return (r["dataset"], r["model"], r["seed"], r["split"], r["config_id"])


# ---------------------------------------------------------------------- summary
def _stats(xs: list[float]) -> dict[str, Any] | None:
    if not xs:
        return None
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "n": len(xs)}


def _setting_rows(records: list[dict[str, Any]], settings: list[Setting], split: str) -> list[dict[str, Any]]:
    """Per setting: values per seed, means, and the paired difference from plain on the same seed."""
    by = {(r["seed"], r["config_id"]): r for r in records if r["split"] == split}
    seeds = sorted({r["seed"] for r in records if r["split"] == split})
    plain = {s: by[(s, "plain")] for s in seeds if (s, "plain") in by}
    rows = []
    for st in settings:
        cid = config_id(st)
        got = {s: by[(s, cid)] for s in seeds if (s, cid) in by}
        if not got:
            continue
        paired = [s for s in got if s in plain]
        row: dict[str, Any] = {"group": st.group, "label": st.label, "config": st.config, "config_id": cid,
                               "seeds": sorted(got),
                               "per_seed": {str(s): {k: got[s][k] for k in ("auc", "logloss", "gauc")} for s in sorted(got)}}
        for metric in ("auc", "logloss", "gauc"):
            vals = [got[s][metric] for s in sorted(got) if got[s][metric] is not None]
            row[metric] = _stats(vals)
            deltas = [got[s][metric] - plain[s][metric] for s in paired
                      if got[s][metric] is not None and plain[s][metric] is not None]
            row[f"delta_{metric}"] = _stats(deltas) if st.config is not None else None
        row["model_rows_per_row"] = statistics.fmean(got[s]["model_rows_per_row"] for s in got)
        row["share_with_paths"] = statistics.fmean(got[s]["share_with_extra_paths"] for s in got)
        row["cpu_seconds"] = statistics.fmean(got[s]["cpu_seconds"] for s in got)
        rows.append(row)
    return rows


def gain_kept(selective: dict[str, Any] | None, full: dict[str, Any] | None) -> float | None:
    """Share of the full configuration's mean AUC gain the selective trigger keeps: mean paired
    Δ AUC of the selective setting over that of the full one. None without a gain to keep."""
    if not selective or not full or not selective.get("delta_auc") or not full.get("delta_auc"):
        return None
    base = full["delta_auc"]["mean"]
    return selective["delta_auc"]["mean"] / base if base > 0 else None


def summarise(records: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for dataset in dict.fromkeys(r["dataset"] for r in records):
        out[dataset] = {}
        for model in dict.fromkeys(r["model"] for r in records if r["dataset"] == dataset):
            rs = [r for r in records if r["dataset"] == dataset and r["model"] == model]
            test = {row["label"]: row for row in _setting_rows(rs, TEST_CONFIGS, "test")}
            for label in SELECTIVE:
                if label in test:
                    test[label]["gain_kept"] = gain_kept(test[label], test.get(FULL))
            out[dataset][model] = {"seeds": sorted({r["seed"] for r in rs}), "test": test,
                                   "valid": _setting_rows(rs, VALID_GRID, "valid")}
    return out


def _pm(s: dict[str, Any] | None, digits: int = 5, signed: bool = False) -> str:
    if s is None:
        return "–"
    return f"{s['mean']:{'+' if signed else ''}.{digits}f} ± {s['std']:.{digits}f}"


def markdown(summary: dict[str, Any]) -> str:
    lines: list[str] = []
    for dataset, models in summary.items():
        for model, block in models.items():
            seeds = block["seeds"]
            lines += [f"#### {dataset} · {model} (seeds {', '.join(map(str, seeds))})", "",
                      "Test split, each configuration scored once per seed (chosen on Frappe_x1 valid, "
                      "docs/test-time.md §6). Per seed: AUC · logloss. Δ: paired by seed, mean ± std.", "",
                      "| configuration | " + " | ".join(f"seed {s}" for s in seeds)
                      + " | Δ AUC | Δ logloss | model rows/row | rows with paths | gain kept |",
                      "|---|" + "---:|" * len(seeds) + "---:|---:|---:|---:|---:|"]
            for label, row in block["test"].items():
                cells = [f"{row['per_seed'][str(s)]['auc']:.5f} · {row['per_seed'][str(s)]['logloss']:.5f}"
                         if str(s) in row["per_seed"] else "–" for s in seeds]
                kept = row.get("gain_kept")
                lines.append(f"| {label} | " + " | ".join(cells) + f" | {_pm(row['delta_auc'], signed=True)} | "
                             f"{_pm(row['delta_logloss'], signed=True)} | {row['model_rows_per_row']:.2f} | "
                             f"{100 * row['share_with_paths']:.1f}% | {'–' if kept is None else f'{100 * kept:.0f}%'} |")
            lines += ["", "Valid split, the ablation grid (mean over seeds; Δ paired with plain on the same seed):", "",
                      "| ablation | setting | valid AUC | Δ AUC | logloss | Δ logloss | model rows/row | rows with paths |",
                      "|---|---|---:|---:|---:|---:|---:|---:|"]
            for row in block["valid"]:
                lines.append(f"| {row['group']} | {row['label']} | {_pm(row['auc'])} | {_pm(row['delta_auc'], signed=True)} | "
                             f"{_pm(row['logloss'])} | {_pm(row['delta_logloss'], signed=True)} | "
                             f"{row['model_rows_per_row']:.2f} | {100 * row['share_with_paths']:.1f}% |")
            lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------- main
def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run_benchmark(runs: list[Run], out: Path, *, resume: bool, threads: int | None, quick: bool,
                  max_rows: int | None, command: str) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    partial = out / PARTIAL
    records: list[dict[str, Any]] = json.loads(partial.read_text()) if resume and partial.is_file() else []
    wanted = {(r.dataset, r.model, r.seed) for r in runs}
    records = [r for r in records if (r["dataset"], r["model"], r["seed"]) in wanted]
    done = {record_key(r) for r in records}
    if done:
        _say(f"resuming: {len(done)} evaluation(s) from {partial}")
    cap = max_rows or (QUICK["max_rows"] if quick else None)
    plan = []
    for run in runs:
        for split, settings in (("valid", VALID_GRID), ("test", TEST_CONFIGS)):
            for st in settings:
                key = (run.dataset, run.model, run.seed, split, config_id(st))
                if key not in done and key not in {p[0] for p in plan}:
                    plan.append((key, run, split, st))
    packages: dict[tuple, Path] = {}
    run_info: list[dict[str, Any]] = []
    for run in runs:
        _say(f"package {run.dataset} {run.model} seed={run.seed} ({run.run_dir})")
        pkg, info = package_for(run, out / "models", quick)
        packages[(run.dataset, run.model, run.seed)] = pkg
        run_info.append({"dataset": run.dataset, "model": run.model, "seed": run.seed, "run_dir": str(run.run_dir),
                         "data_dir": str(run.data_dir), "package": str(pkg), **info})
    started = time.perf_counter()
    for k, (key, run, split, st) in enumerate(plan):
        res = evaluate(packages[key[:3]], run, split, st, threads, cap)
        rec = {"dataset": run.dataset, "model": run.model, "seed": run.seed, "split": split,
               "config_id": key[4], "label": st.label, **res}
        records.append(rec)
        partial.write_text(json.dumps(records, indent=1))
        plain = next((r for r in records if record_key(r) == (*key[:4], "plain")), None)
        delta = f" Δ={res['auc'] - plain['auc']:+.5f}" if plain and key[4] != "plain" and res["auc"] is not None else ""
        elapsed = time.perf_counter() - started
        left = elapsed / (k + 1) * (len(plan) - k - 1)
        _say(f"[{len(done) + k + 1}/{len(done) + len(plan)}] {run.dataset} {run.model} seed={run.seed} {split} "
             f"{st.label}: auc={res['auc']:.5f}{delta} logloss={res['logloss']:.5f} rows/row={res['model_rows_per_row']:.2f} "
             f"{res['seconds']:.1f}s (elapsed {elapsed / 60:.1f} min, ~{left / 60:.0f} min left)")
    summary = summarise(records)
    text = markdown(summary)
    payload = {"command": command, "quick": quick, "max_rows": cap, "threads": threads,
               "grid": {"valid": [s._asdict() for s in VALID_GRID], "test": [s._asdict() for s in TEST_CONFIGS]},
               "runs": run_info, "summary": summary, "evaluations": records,
               "cpu_seconds": {"evaluations": round(sum(r["cpu_seconds"] for r in records), 2)}}
    (out / "test_time.json").write_text(json.dumps(payload, indent=1))
    (out / "test_time.md").write_text(f"`{command}`\n\n{text}")
    _say(f"wrote {out / 'test_time.json'} and {out / 'test_time.md'} "
         f"({(time.perf_counter() - started) / 60:.1f} min, {len(plan)} evaluation(s))")
    return payload


def parse_seeds(text: str | None) -> list[int] | None:
    """`3` is seeds 1..3; `1,2,5` is those seeds (as benchmarks/quality.py reads them)."""
    if not text:
        return None
    if text.isdigit() and int(text) <= 10:
        return list(range(1, int(text) + 1))
    return [int(s) for s in text.split(",") if s.strip()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("outputs", nargs="*", type=Path, help="benchmarks/quality.py --datasets output directories")
    ap.add_argument("--runs", nargs="+", type=Path, default=[], help="training run directories named directly")
    ap.add_argument("--out", type=Path, help="output directory (default: the first quality output's test_time/)")
    ap.add_argument("--datasets", help="only these data sets (comma-separated names or shell patterns)")
    ap.add_argument("--models", help="only these models (comma-separated)")
    ap.add_argument("--seeds", help="only these seeds: a count N for 1..N, or a comma-separated list")
    ap.add_argument("--resume", action="store_true", help=f"skip the evaluations OUT/{PARTIAL} holds")
    ap.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads and torch threads (0: their defaults)")
    ap.add_argument("--quick", action="store_true",
                    help=f"splits capped at {QUICK['max_rows']} rows, statistics 2^{QUICK['width_log2']} wide (tests, CI)")
    ap.add_argument("--max-rows", type=int, default=0, help="score only the first N rows of each split (0: all)")
    args = ap.parse_args(argv)
    if not args.outputs and not args.runs:
        ap.error("give quality benchmark output directories or --runs RUN_DIR ...")
    try:
        runs = [r for d in args.outputs for r in runs_of_quality_dir(d)] + [run_of_dir(d) for d in args.runs]
        runs = select(runs, args.datasets, args.models, parse_seeds(args.seeds))
    except (ValueError, FileNotFoundError) as exc:
        ap.error(str(exc))
    if not runs:
        ap.error("no runs selected")
    out = args.out or (args.outputs[0] / "test_time" if args.outputs else None)
    if out is None:
        ap.error("--runs needs --out")
    threads = args.threads or None
    if threads:
        import torch

        torch.set_num_threads(threads)
    cmd = " ".join(["python benchmarks/test_time.py", *(argv if argv is not None else sys.argv[1:])])
    run_benchmark(runs, out, resume=args.resume, threads=threads, quick=args.quick,
                  max_rows=args.max_rows or None, command=cmd)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
