"""`ctr stats build|merge` and `ctr evaluate`. Standard library only at module level.

    ctr stats build --package MODELS/NAME/VERSION [--data DIR]   # into the package folder
    ctr stats build --run RUN_DIR [--data DIR]                    # into the run folder
    ctr stats build --spec SPEC.json --data FILE --out SHARD.npz   # one shard
    ctr stats merge SHARD1.npz SHARD2.npz ... --out FILE.npz [--package P]
    ctr evaluate --package MODELS/NAME/VERSION --data DIR [--split test] [--test-time matt --set paths=8 ...]
    ctr evaluate ... --test-time sgctr --set passes=2 [--noise 0.1 --noise-seed 0]
    ctr sgctr export --run RUN_DIR --package MODELS/NAME/VERSION [--passes 1,2,3] [--set selection=random ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def register(sub: argparse._SubParsersAction) -> None:
    stats = sub.add_parser("stats", help="feature-combination statistics for test-time paths (MATT)")
    stats_sub = stats.add_subparsers(dest="stats_command", metavar="ACTION")
    stats_sub.required = True

    build = stats_sub.add_parser("build", help="count combinations of orders 1-3 over a training split, streaming")
    where = build.add_mutually_exclusive_group(required=True)
    where.add_argument("--package", help="model package folder: the statistics are written into it")
    where.add_argument("--run", help="training run folder: the statistics are written into it")
    where.add_argument("--spec", help="fitted spec JSON (with --data FILE and --out): build one shard")
    build.add_argument("--data", help="data directory (its train split) or one file; default: the run's data")
    build.add_argument("--split", default="train", help="split to count (default train)")
    build.add_argument("--out", help="output .npz (default: test_time_stats.npz in the package/run folder)")
    build.add_argument("--orders", default="1,2,3", help="orders to count, e.g. 1,2 (default 1,2,3)")
    build.add_argument("--pair-fields", help="comma-separated fields for pairs (default: the --pair-top-k largest)")
    build.add_argument("--pair-top-k", type=int, default=5, help="pairs over the k fields with most values (0: all; default 5)")
    build.add_argument("--triple-fields", help="comma-separated fields for triples (default: the --triple-top-k largest)")
    build.add_argument("--triple-top-k", type=int, default=4, help="triples over the k fields with most values (0: all; default 4)")
    build.add_argument("--width-log2", type=int, default=20, help="count-min width 2^k per order (default 20)")
    build.add_argument("--depth", type=int, default=4, help="count-min hash rows (default 4)")
    build.add_argument("--heavy", type=int, default=65536, help="heavy hitters kept per order (default 65536)")
    build.add_argument("--read-rows", type=int, default=262144, help="rows read and encoded per chunk (default 262144)")
    build.set_defaults(handler=_build)

    merge = stats_sub.add_parser("merge", help="merge statistics of shards of one log")
    merge.add_argument("inputs", nargs="+", help="shard .npz files (each with its manifest)")
    merge.add_argument("--out", required=True, help="merged .npz")
    merge.set_defaults(handler=_merge)

    ev = sub.add_parser("evaluate", help="score a split with a model package through onnxruntime (plain or MATT)")
    ev.add_argument("--package", required=True, help="model package folder MODELS/NAME/VERSION")
    ev.add_argument("--data", required=True, help="data directory (or one file)")
    ev.add_argument("--split", default="test", help="split to score (default test; choose settings on valid)")
    ev.add_argument("--test-time", choices=["none", "matt", "sgctr"], default="none", help="test-time method (default none)")
    ev.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="a TestTimeConfig (matt) or SgctrConfig (sgctr) setting, e.g. paths=8 or passes=2 (repeatable)")
    ev.add_argument("--noise", type=float, default=0.0,
                    help="noise stress test: replace this share of fields at random before scoring (e.g. 0.1)")
    ev.add_argument("--noise-seed", type=int, default=0, help="seed of the replaced fields (default 0)")
    ev.add_argument("--max-rows", type=int, help="score only the first N rows")
    ev.add_argument("--chunk-rows", type=int, default=4096, help="rows expanded and scored per call (default 4096)")
    ev.add_argument("--threads", type=int, help="onnxruntime intra-op threads")
    ev.set_defaults(handler=_evaluate)

    sg = sub.add_parser("sgctr", help="SGCTR refinement graphs of a DGenCTR package (docs/sgctr.md)")
    sg_sub = sg.add_subparsers(dest="sgctr_command", metavar="ACTION")
    sg_sub.required = True
    sgx = sg_sub.add_parser("export", help="export refinement graphs (one per R) from the run into its package")
    sgx.add_argument("--run", required=True, help="the training run the package was exported from")
    sgx.add_argument("--package", required=True, help="model package folder MODELS/NAME/VERSION")
    sgx.add_argument("--passes", default="1,2,3", help="R values, one graph each (default 1,2,3)")
    sgx.add_argument("--set", action="append", metavar="KEY=VALUE", help="an SgctrConfig setting, e.g. selection=random")
    sgx.add_argument("--data", help="data directory: the generator's fit is measured on its valid split (default: the run's)")
    sgx.add_argument("--generator-rows", type=int, default=4096, help="valid rows for the generator report (0: skip)")
    sgx.set_defaults(handler=_sgctr_export)


def _fields(arg: str | None) -> list[str] | None:
    return [f.strip() for f in arg.split(",") if f.strip()] if arg else None


def _build(args: argparse.Namespace) -> int:
    from model.readers import split_path
    from model.spec import FeatureSpec
    from testtime.stats import STATS_FILE, StatsConfig, build_from_file

    cfg = StatsConfig(
        orders=tuple(int(o) for o in args.orders.split(",")),
        depth=args.depth,
        width_log2=args.width_log2,
        heavy_capacity=args.heavy,
        pair_fields=_fields(args.pair_fields),
        pair_top_k=args.pair_top_k or None,
        triple_fields=_fields(args.triple_fields),
        triple_top_k=args.triple_top_k or None,
    )
    extra: dict[str, Any] = {}
    if args.package:
        from export.package import verify_package

        pkg = verify_package(args.package, smoke_run=False)
        spec, folder = pkg.spec, pkg.path
        data = args.data or _run_data(pkg.metadata.get("source_run"))
        extra["feature_spec_sha256"] = pkg.metadata.get("feature_spec_sha256")
        extra["onnx_sha256"] = pkg.metadata.get("onnx_sha256")
    elif args.run:
        folder = Path(args.run)
        spec = FeatureSpec.load(folder / "feature_spec.json")
        data = args.data or _run_data(str(folder))
    else:
        if not args.out or not args.data:
            raise ValueError("--spec needs --data and --out")
        spec, folder, data = FeatureSpec.load(args.spec), None, args.data
    if not spec.fitted:
        raise ValueError("the spec is not fitted")
    if data is None:
        raise ValueError("no training data known for this package/run: pass --data DIR")
    src = Path(data)
    path = split_path(src, args.split) if src.is_dir() else src
    stats = build_from_file(spec, path, cfg, read_rows=args.read_rows)
    out = Path(args.out) if args.out else Path(folder) / STATS_FILE  # type: ignore[arg-type]
    if args.package and out.resolve().parent != Path(args.package).resolve():
        raise ValueError("with --package the statistics go into the package folder; leave out --out")
    if args.package and out.name != STATS_FILE:
        raise ValueError(f"a package's statistics file is named {STATS_FILE}")
    manifest = stats.save(out, **extra, data={"file": str(path), "split": args.split})
    src_info = stats.extra.get("source", {})
    print(json.dumps({"out": str(out), "rows": stats.rows, "bytes": manifest["bytes"], "sha256": manifest["sha256"],
                      "orders": list(cfg.orders),
                      "combinations": {str(o): lay.size for o, lay in stats.layouts.items()},
                      "heavy_exact": {str(o): h.exact for o, h in stats.heavy.items()},
                      "count_rows_per_second": round(stats.rows / src_info["count_seconds"]) if src_info.get("count_seconds") else None,
                      "total_rows_per_second": round(stats.rows / src_info["total_seconds"]) if src_info.get("total_seconds") else None},
                     indent=2))
    return 0


def _run_data(run_dir: str | None) -> str | None:
    if not run_dir:
        return None
    cfg_path = Path(run_dir) / "config.json"
    if not cfg_path.is_file():
        return None
    data = (json.loads(cfg_path.read_text(encoding="utf-8")).get("data") or {}).get("dir")
    return data if isinstance(data, str) and Path(data).exists() else None


def _merge(args: argparse.Namespace) -> int:
    from testtime.stats import ComboStats

    parts = [ComboStats.load(p) for p in args.inputs]
    merged = parts[0]
    for p in parts[1:]:
        merged = merged.merge(p)
    manifest = merged.save(args.out, merged_from=[Path(p).name for p in args.inputs])
    print(json.dumps({"out": args.out, "rows": merged.rows, "bytes": manifest["bytes"], "sha256": manifest["sha256"]}, indent=2))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from testtime.evaluate import evaluate_package, parse_sets
    from testtime.matt import TestTimeConfig

    sets = parse_sets(args.set)
    if sets and args.test_time == "none":
        raise ValueError("--set needs --test-time matt or sgctr")
    if args.test_time == "sgctr":
        from testtime.sgctr import SgctrConfig

        cfg: Any = SgctrConfig(**sets)
    else:
        cfg = TestTimeConfig(method=args.test_time, **sets)
    result = evaluate_package(args.package, args.data, args.split, cfg, max_rows=args.max_rows,
                              chunk_rows=args.chunk_rows, threads=args.threads,
                              noise=args.noise, noise_seed=args.noise_seed)
    print(json.dumps(result, indent=2))
    return 0


def _sgctr_export(args: argparse.Namespace) -> int:
    from export.onnx_export import export_refinement
    from model.run_io import load_run
    from testtime.evaluate import parse_sets
    from testtime.sgctr import SgctrConfig

    sets = parse_sets(args.set)
    run = load_run(args.run)
    sets.setdefault("tau", float(((run.config.get("train") or {}).get("pretrain") or {}).get("tau", 0.1)))
    configs = [SgctrConfig(**{**sets, "passes": int(r)}) for r in str(args.passes).split(",") if r.strip()]
    generator = None
    data = args.data or _run_data(args.run)
    if args.generator_rows and data:
        generator = _generator_report(run, data, args.generator_rows)
    manifest = export_refinement(run.model, args.package, configs, generator=generator)
    print(json.dumps({"package": args.package, "generator": generator,
                      "graphs": [{k: e[k] for k in ("file", "passes", "runs_per_row", "bytes")} | {"max_abs_diff": e["parity"]["max_abs_diff"]}
                                 for e in manifest["graphs"]]}, indent=2))
    return 0


def _generator_report(run: Any, data: str, rows: int) -> dict[str, Any]:
    import torch

    from model.readers import read_table, split_path
    from model.refine import generator_report

    table = read_table(split_path(Path(data), "valid") if Path(data).is_dir() else Path(data)).iloc[:rows]
    tokens = torch.from_numpy(run.spec.encode(table, strict=False))
    return generator_report(run.model, tokens, run.spec.field_names)
