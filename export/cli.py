"""`ctr export ...` and `ctr models list`. Only the standard library at module level.

`ctr export` has two actions. Publishing is the default, so the common command needs no
action word; `verify` is an optional sub-action:

    ctr export --run RUN_DIR --repo MODELS_DIR --name NAME [--version N] [--precision fp32|fp16|int8]
               [--stats copy|build|none] [--stats-data DIR]
    ctr export verify PATH [--torch-run RUN_DIR]
    ctr models list --repo MODELS_DIR [--verify]

Publish options given after `verify` are not accepted (they belong to the publish action).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    exp = sub.add_parser(
        "export",
        help="export a training run to an ONNX model package (or: ctr export verify PATH)",
        description="Export a run to MODELS_DIR/NAME/VERSION (default action), or verify a package "
        "with `ctr export verify PATH`.",
    )
    exp.add_argument("--run", help="training run directory (model.safetensors, feature_spec.json, config.json)")
    exp.add_argument("--repo", help="model repository directory (MODELS_DIR)")
    exp.add_argument("--name", help="model name in the repository")
    exp.add_argument("--version", type=int, help="explicit version (refused if it exists); default: next free")
    exp.add_argument("--precision", choices=["fp32", "fp16", "int8"], default="fp32",
                     help="fp16 for GPU serving, int8 (dynamic quantisation) for CPU; default fp32")
    exp.add_argument("--valid-data", help="validation split (dir or file) for the fp16/int8 AUC change; default: the run's data")
    exp.add_argument("--eval-rows", type=int, default=200_000, help="validation rows scored for the AUC change")
    exp.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's)")
    exp.add_argument("--no-optimize", action="store_true", help="skip onnxruntime's BASIC graph optimisation")
    exp.add_argument("--stats", choices=STATS_MODES, default="copy",
                     help="test-time statistics (MATT) in the package: copy = the run's test_time_stats.npz when it has "
                          "one (default); build = copy, else build from the run's train split; none = leave them out")
    exp.add_argument("--stats-data", help="with --stats build: the data directory (its train split) or file; default: the run's data")
    exp.set_defaults(handler=_export)

    actions = exp.add_subparsers(dest="export_action", metavar="[verify]")
    actions.required = False
    ver = actions.add_parser("verify", help="verify a model package folder; exit 1 if it is refused")
    ver.add_argument("path", help="package folder MODELS_DIR/NAME/VERSION")
    ver.add_argument("--torch-run", help="also compare onnxruntime with this run's torch model on fresh random rows")
    ver.add_argument("--atol", type=float, help="parity tolerance (default 1e-5 for fp32 packages)")
    ver.set_defaults(handler=_verify)

    models = sub.add_parser("models", help="inspect a model repository")
    models_sub = models.add_subparsers(dest="models_command", metavar="ACTION")
    models_sub.required = True
    lst = models_sub.add_parser("list", help="list models and versions in a repository")
    lst.add_argument("--repo", required=True, help="model repository directory (MODELS_DIR)")
    lst.add_argument("--name", help="only this model")
    lst.add_argument("--verify", action="store_true", help="run the full package check on every version")
    lst.add_argument("--json", action="store_true", help="print JSON instead of a table")
    lst.set_defaults(handler=_models_list)


def _export(args: argparse.Namespace) -> int:
    missing = [f"--{k}" for k in ("run", "repo", "name") if not getattr(args, k)]
    if missing:
        raise ValueError(f"missing {' '.join(missing)} (usage: ctr export --run RUN_DIR --repo MODELS_DIR --name NAME)")
    from export.onnx_export import ExportOptions, export_run

    options = ExportOptions(
        precision=args.precision,
        opset=args.opset,
        optimization="none" if args.no_optimize else "basic",
        valid_data=args.valid_data,
        eval_rows=args.eval_rows,
    )
    pkg = export_run(args.run, args.repo, args.name, version=args.version, options=options)
    try:
        stats = attach_stats(pkg.path, args.run, args.stats, data=args.stats_data)
    except ValueError as exc:  # the package is published and valid, only without statistics
        raise ValueError(f"{pkg.path} was published without test-time statistics: {exc}") from exc
    meta = pkg.metadata
    print(json.dumps({
        "package": str(pkg.path),
        "name": pkg.name,
        "version": pkg.version,
        "model_type": meta.get("model_type"),
        "precision": meta.get("precision"),
        "onnx_bytes": meta.get("onnx_bytes"),
        "opset": meta.get("opset"),
        "parity_max_abs_diff": meta.get("parity", {}).get("max_abs_diff"),
        "precision_eval": meta.get("precision_eval"),
        "test_time_stats": stats,
    }, indent=2))
    return 0


# `--stats`: `copy` is the default because building reads the whole training split at export
# time. Counting runs at ~1M rows/s, but encoding the log with the spec (~70-100k rows/s,
# docs/test-time.md §5) dominates: seconds on Frappe_x1, tens of minutes on a production log,
# which `ctr stats build` can count in shards and merge instead. The training data may also
# not be on the exporting machine. A package without statistics still serves plain, and a
# MATT variant on it is refused at load with the command that builds them.
STATS_MODES = ("copy", "build", "none")


def attach_stats(package_dir: str | Path, run_dir: str | Path | None, mode: str = "copy", *,
                 data: str | Path | None = None, config: object = None) -> dict:
    """Put test-time statistics into a published package: the run's own file when it has one
    (`ctr stats build --run`), else, with mode `build`, a fresh count of the train split.

    The copied npz keeps its bytes and sha256; its manifest gains the package's
    `feature_spec_sha256` and `onnx_sha256`, after the file was loaded against the package's
    spec, so `ctr export verify` checks it like one built with `--package`. The npz is renamed
    in before its manifest (each atomically), as `ctr stats build --package` writes them.
    Returns what was done: {"status": "copied"|"built"|"present"|"none", ...}.
    """
    from export.package import TEST_TIME_MANIFEST_FILE, TEST_TIME_STATS_FILE, verify_package
    from testtime.stats import ComboStats, StatsError, _atomic_write, check_manifest

    if mode not in STATS_MODES:
        raise ValueError(f"--stats must be one of {', '.join(STATS_MODES)}, got {mode!r}")
    pkg = verify_package(package_dir, smoke_run=False)
    target = pkg.path / TEST_TIME_STATS_FILE
    if mode == "none":
        return {"status": "none", "reason": "--stats none"}
    if target.is_file() and (pkg.path / TEST_TIME_MANIFEST_FILE).is_file():
        return {"status": "present", "file": str(target)}
    ids = {"feature_spec_sha256": pkg.metadata.get("feature_spec_sha256"), "onnx_sha256": pkg.metadata.get("onnx_sha256")}
    source = Path(run_dir) / TEST_TIME_STATS_FILE if run_dir else None
    if source is not None and source.is_file():
        raw = source.read_bytes()
        try:
            manifest = check_manifest(source, raw)
            stats = ComboStats.from_bytes(raw, pkg.spec)
        except StatsError as exc:
            raise ValueError(f"the run's {source.name} cannot be used: {exc}") from exc
        manifest = {**manifest, **ids, "copied_from": str(source.resolve())}
        _atomic_write(target, raw)
        _atomic_write(pkg.path / TEST_TIME_MANIFEST_FILE, (json.dumps(manifest, indent=1) + "\n").encode())
        status = {"status": "copied", "from": str(source), "rows": stats.rows, "bytes": len(raw)}
    elif mode == "build":
        from model.readers import split_path
        from testtime.cli import _run_data
        from testtime.stats import StatsConfig, build_from_file

        src = data or _run_data(str(run_dir) if run_dir else pkg.metadata.get("source_run"))
        if src is None:
            raise ValueError("the run has no test_time_stats.npz and its training data was not found: pass --stats-data DIR")
        path = split_path(Path(src), "train") if Path(src).is_dir() else Path(src)
        stats = build_from_file(pkg.spec, path, config if isinstance(config, StatsConfig) else None)
        manifest = stats.save(target, **ids, data={"file": str(path), "split": "train"})
        status = {"status": "built", "from": str(path), "rows": stats.rows, "bytes": manifest["bytes"]}
    else:
        return {"status": "none", "reason": "the run has no test_time_stats.npz (ctr stats build --run, or --stats build)"}
    try:
        verify_package(pkg.path, smoke_run=False)
    except ValueError:  # leave the package as it was published: valid, without statistics
        for f in (TEST_TIME_MANIFEST_FILE, TEST_TIME_STATS_FILE):
            (pkg.path / f).unlink(missing_ok=True)
        raise
    return status


def _verify(args: argparse.Namespace) -> int:
    from export.package import PackageError, verify_package

    try:
        pkg = verify_package(args.path)
    except PackageError as exc:
        print(f"REFUSED {args.path}: {exc}", file=sys.stderr)
        return 1
    result = {"package": str(pkg.path), "name": pkg.name, "version": pkg.version,
              "model_type": pkg.model_type, "precision": pkg.metadata.get("precision", "fp32"), "ok": True}
    if args.torch_run:
        from export.onnx_export import VARIANT_SANITY_ATOL
        from export.parity import FP32_ATOL, ParityError, check_parity
        from model.run_io import load_run

        run = load_run(args.torch_run)
        if run.spec.to_dict() != pkg.spec.to_dict():
            print(f"REFUSED {args.path}: its feature_spec.json is not the spec of run {args.torch_run}", file=sys.stderr)
            return 1
        precision = str(pkg.metadata.get("precision", "fp32"))
        atol = args.atol if args.atol is not None else VARIANT_SANITY_ATOL.get(precision, FP32_ATOL)
        try:
            report = check_parity(run.model, pkg.onnx_path, pkg.spec, atol=atol)
        except ParityError as exc:
            print(f"REFUSED {args.path}: {exc}", file=sys.stderr)
            return 1
        result["parity"] = report.as_dict()
    print(json.dumps(result, indent=2))
    return 0


def _models_list(args: argparse.Namespace) -> int:
    from export.package import PackageError, list_models, list_versions, package_path, verify_package

    names = [args.name] if args.name else list_models(args.repo)
    rows = []
    for name in names:
        for version in list_versions(args.repo, name):
            path = package_path(args.repo, name, version)
            row = {"name": name, "version": version, "status": "ok"}
            try:
                meta = verify_package(path).metadata if args.verify else _read_meta(path)
            except (PackageError, OSError, ValueError) as exc:
                meta, row["status"] = {}, f"REFUSED: {exc}"
            valid = (meta.get("metrics") or {}).get("valid") or {}
            row.update({
                "model_type": meta.get("model_type", "?"),
                "precision": meta.get("precision", "fp32"),
                "valid_auc": valid.get("auc"),
                "onnx_bytes": meta.get("onnx_bytes"),
                "created_at": meta.get("created_at", "?"),
            })
            rows.append(row)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no models in {args.repo}")
        return 0
    header = ("NAME", "VERSION", "TYPE", "PRECISION", "VALID_AUC", "SIZE", "CREATED_AT", "STATUS")
    table = [header] + [(
        r["name"], str(r["version"]), str(r["model_type"]), str(r["precision"]),
        f"{r['valid_auc']:.4f}" if isinstance(r["valid_auc"], (int, float)) else "-",
        _size(r["onnx_bytes"]), str(r["created_at"]), r["status"],
    ) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header) - 1)]
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1])
    return 0


def _read_meta(path: Path) -> dict:
    meta = json.loads((path / "metadata.json").read_text(encoding="utf-8"))
    if not isinstance(meta, dict):
        raise ValueError("metadata.json is not an object")
    return meta


def _size(n: object) -> str:
    if not isinstance(n, int):
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return "-"
