"""`ctr data ...` (and, from the training module, `ctr train`). Heavy imports stay in handlers."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="make or inspect datasets")
    data_sub = data.add_subparsers(dest="data_command", metavar="ACTION")
    data_sub.required = True

    synth = data_sub.add_parser("synth", help="generate synthetic CTR data with known click probabilities")
    synth.add_argument("--out", required=True, help="output directory")
    synth.add_argument("--seed", type=int, default=7)
    synth.add_argument("--rows", type=int, default=200_000)
    synth.add_argument("--users", type=int, default=5_000)
    synth.add_argument("--items", type=int, default=2_000)
    synth.add_argument("--label-rate", type=float, default=0.15)
    synth.add_argument("--format", choices=["parquet", "csv"], default="parquet")
    synth.set_defaults(handler=_synth)

    fit = data_sub.add_parser("fit-spec", help="fit a spec's vocabularies on a training split and save it")
    fit.add_argument("--spec", required=True, help="spec file or shipped name (synthetic, frappe_x1, criteo_sample)")
    fit.add_argument("--data", required=True, help="directory with a train split, or one data file")
    fit.add_argument("--out", required=True, help="where to write the fitted spec JSON")
    fit.set_defaults(handler=_fit_spec)


def _synth(args: argparse.Namespace) -> int:
    from model.synth import SynthConfig, synthesize

    cfg = SynthConfig(
        seed=args.seed,
        rows=args.rows,
        users=args.users,
        items=args.items,
        label_rate=args.label_rate,
        fmt=args.format,
    )
    meta = synthesize(cfg, args.out)
    print(json.dumps({"out": args.out, "label_rate": meta["label_rate"], "bayes_auc": meta["bayes_auc"]}, indent=2))
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
