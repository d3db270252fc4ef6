"""`ctr serve` and `ctr features load`. Only the standard library is imported at module level."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser("serve", help="run the scoring service (FastAPI + onnxruntime)")
    serve.add_argument("--repo", help="model repository (MODELS_DIR/NAME/VERSION)")
    serve.add_argument("--config", help="YAML or JSON service config (see docs/service.md)")
    serve.add_argument("--model", help="serve this model as variant 'main' (newest version)")
    serve.add_argument("--version", type=int, help="with --model: pin this version")
    serve.add_argument("--redis", help="Redis URL (redis://, rediss://, redis+cluster://); default: embedded store")
    serve.add_argument("--prefix", help="Redis key prefix (default ctr)")
    serve.add_argument("--users", help="embedded store: users table (parquet/csv)")
    serve.add_argument("--items", help="embedded store: items table (parquet/csv)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--max-batch-rows", type=int)
    serve.add_argument("--max-queue-delay-ms", type=float)
    serve.add_argument("--no-batching", action="store_true", help="one onnxruntime call per request")
    serve.add_argument("--intra-op-threads", type=int)
    serve.add_argument("--providers", help="comma-separated onnxruntime providers, in preference order")
    serve.add_argument("--reload-poll-s", type=float, help="poll the repository for new versions")
    serve.add_argument(
        "--workers", type=int,
        help="worker processes on one port (default: one per usable core, at most 8; 1 on a GPU host); 1 = no parent process",
    )
    serve.add_argument(
        "--drain-grace-s", type=float,
        help="SIGTERM: readiness false and still serving this long, then stop accepting and drain (default 5)",
    )
    serve.add_argument("--run-dir", help="with several workers: their shared directory (metrics files, versions); default a fresh temporary one")
    serve.set_defaults(handler=_serve)

    feats = sub.add_parser("features", help="feature store tools")
    fsub = feats.add_subparsers(dest="features_command", metavar="ACTION")
    fsub.required = True
    load = fsub.add_parser("load", help="bulk-load a users/items table into Redis hashes")
    load.add_argument("--table", required=True, help="parquet or csv with a <entity>_id column")
    load.add_argument("--entity", required=True, choices=["user", "item"])
    load.add_argument("--redis", required=True, help="Redis URL")
    load.add_argument("--prefix", default="ctr")
    load.add_argument("--ttl", type=int, default=0, help="seconds; 0 = no expiry")
    load.set_defaults(handler=_features_load)


def build_config(args: argparse.Namespace):  # -> ServiceConfig
    from service.config import VariantConfig, load_settings

    # configure_logging: a config file's log_format/log_level apply too (the CLI's own
    # --log-level/--log-format reach the settings as CTR_ variables, which outrank the file).
    cfg = load_settings(
        args.config,
        configure_logging=True,
        repo=args.repo,
        reload_poll_s=args.reload_poll_s,
        features__redis_url=args.redis,
        features__prefix=args.prefix,
        features__users_table=args.users,
        features__items_table=args.items,
        batcher__max_batch_rows=args.max_batch_rows,
        batcher__max_queue_delay_ms=args.max_queue_delay_ms,
        batcher__enabled=False if args.no_batching else None,
        scorer__intra_op_threads=args.intra_op_threads,
        scorer__providers=args.providers.split(",") if args.providers else None,
        drain_grace_s=getattr(args, "drain_grace_s", None),
    )
    if "drain_grace_s" not in cfg.model_fields_set:
        # `ctr serve` drains with the documented grace unless a config file or flag sets one.
        from service.server import DEFAULT_DRAIN_GRACE_S

        cfg = cfg.model_copy(update={"drain_grace_s": DEFAULT_DRAIN_GRACE_S})
    if args.model:
        vc = VariantConfig(name="main", model=args.model, version=args.version if args.version else "latest")
        cfg = cfg.model_copy(update={"variants": [vc]})
    return cfg


def _serve(args: argparse.Namespace) -> int:
    import logging
    from pathlib import Path

    from service.workers import Plan, Supervisor, default_intra_op_threads, default_workers, usable_cores

    cfg = build_config(args)
    workers = args.workers if args.workers else default_workers(cfg.scorer.providers)
    if workers < 1:
        raise ValueError("--workers must be at least 1")
    if workers == 1:
        from service.app import create_app
        from service.server import serve

        serve(create_app(cfg), args.host, args.port, cfg.drain_grace_s, cfg.log_level.lower())
        return 0
    if cfg.scorer.intra_op_threads == 0:  # "all cores" per worker would oversubscribe them
        cfg = cfg.model_copy(update={"scorer": cfg.scorer.model_copy(update={"intra_op_threads": default_intra_op_threads(workers)})})
    elif workers * cfg.scorer.intra_op_threads > 2 * usable_cores():
        logging.getLogger("service").warning(
            "threads_oversubscribed workers=%d intra_op_threads=%d cores=%d (intra_op_threads 0 picks the measured default)",
            workers, cfg.scorer.intra_op_threads, usable_cores(),
        )
    plan = Plan(workers=workers, host=args.host, port=args.port, drain_grace_s=cfg.drain_grace_s)
    return Supervisor(cfg, plan, Path(args.run_dir) if args.run_dir else None).run()


def _features_load(args: argparse.Namespace) -> int:
    from service.features import bulk_load

    out = bulk_load(args.table, args.entity, args.redis, args.prefix, args.ttl)
    m = out["manifest"]
    print(json.dumps({"entity": args.entity, "rows": out["rows"], "seconds": round(out["seconds"], 3), "rows_per_s": round(out["rows_per_s"]),
                      "manifest": {"key": f"{args.prefix}:manifest:{args.entity}", "fields": m.fields, "fingerprint": m.fingerprint}}))
    return 0
