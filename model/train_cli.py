"""`ctr train`: train one model and write its run directory.

Only the standard library is imported at module level, so `ctr --help` and `ctr serve` never
load torch; the handler imports the training code.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

MODEL_CHOICES = ("dgenctr", "dnn", "deepfm", "dcnv2")


def _kv_option(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got '{text}'")
    key, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip().replace("-", "_"), value


def _epoch_list(text: str) -> list[int]:
    try:
        epochs = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected epochs like 10 or 10,15, got '{text}'") from None
    if not epochs or min(epochs) < 1 or epochs != sorted(set(epochs)):
        raise argparse.ArgumentTypeError(f"expected increasing epochs >= 1, got '{text}'")
    return epochs


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train and evaluate a CTR model; writes weights, spec, config and metrics",
        description="Train DGenCTR (two stages) or a baseline on DIR/{train,valid,test}; the spec is fitted on train only. "
        "The settings come from a recipe (--config; without it, the shipped recipe for the spec's data set and the model), "
        "then the flags below, then --set. Also runs under `torchrun --nproc_per_node=N -m ctr train ...` (DDP).",
    )
    p.add_argument("--config", default=None, metavar="RECIPE",
                   help="a recipe (YAML, e.g. recipes/frappe_x1/dgenctr.yaml or the name frappe_x1/dgenctr) or a run's "
                        "config.json; default: recipes/DATASET/MODEL.yaml, else recipes/synthetic/MODEL.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one recipe key after the flags (repeatable; dotted, value read as YAML): "
                        "--set train.lr=3e-3 --set model.d_model=64 --set field_mask_rate=0.2")
    p.add_argument("--spec", default=None, help="spec file or shipped name (synthetic, frappe_x1, criteo_sample); or `spec:` in the config")
    p.add_argument("--data", default=None, help="directory with train/valid/test splits (csv or parquet); or `data:` in the config")
    p.add_argument("--model", default=None, help=f"one of {', '.join(MODEL_CHOICES)}; or `model_type:` in the config")
    p.add_argument("--out", required=True, help="run directory to write")
    p.add_argument("--seed", type=int, default=None, help="default 2024")

    t = p.add_argument_group("training (stage 2 for dgenctr)",
                             "a flag overrides the recipe's value; a key neither sets takes TrainConfig's default (model/trainer.py)")
    t.add_argument("--epochs", type=int, default=None, help="max epochs; early stopping usually ends sooner")
    t.add_argument("--batch-size", type=int, default=None, help="left out by flag and recipe: 1024 for dgenctr, 4096 for the baselines")
    t.add_argument("--lr", type=float, default=None, help="Adam learning rate")
    t.add_argument("--weight-decay", type=float, default=None)
    t.add_argument("--embedding-l2", type=float, default=None, help="FuxiCTR embedding_regularizer: + L2/2 * ||E||^2 each step (e.g. 0.05)")
    t.add_argument("--patience", type=int, default=None, help="epochs without a valid-AUC gain before stopping")
    t.add_argument("--lr-patience", type=int, default=None, help="extra epochs without a gain before the LR decays (by --lr-decay)")
    t.add_argument("--lr-decay", type=float, default=None,
                   help="factor each LR decay multiplies by (default 0.1; 1: a constant LR, e.g. with --ema-decay)")
    t.add_argument("--lr-decay-epochs", type=_epoch_list, default=None, metavar="E[,E...]",
                   help="decay the LR (by --lr-decay) after these epochs instead of on a plateau; early stopping waits for the last")
    t.add_argument("--ema-decay", type=float, default=None,
                   help="score, early-stop on and keep an exponential moving average of the weights with this "
                        "per-step decay (e.g. 0.995; 0: off)")
    t.add_argument("--ema-epochs", type=float, default=None, metavar="H",
                   help="the same average given as a horizon in epochs instead (per-step decay 1 - 1/(H x steps per "
                        "epoch), so it carries across batch sizes; e.g. 1; not with --ema-decay)")
    t.add_argument("--field-mask-rate", type=float, default=None,
                   help="replace each field by its [MASK] with this probability while training (input dropout; 0: off)")
    t.add_argument("--calibration", choices=["platt", "none"], default=None,
                   help="post-hoc calibration fitted on the validation logits (the exported model scores with it; "
                        "metrics.json keeps the raw numbers and adds 'calibrated')")
    t.add_argument("--max-steps-per-epoch", type=int, default=None, help="cap steps per epoch (smoke runs); 0 = all")
    t.add_argument("--max-rows", type=int, default=None, help="use only the first N rows of each split")
    t.add_argument("--threads", type=int, default=None, help="torch threads per process (0: cores / processes)")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")

    m = p.add_argument_group("network")
    m.add_argument("--embedding-dim", type=int, default=None, help="embedding width (dgenctr: 0 = d_model)")
    m.add_argument("--hidden", default=None, help="MLP widths for dnn/deepfm/dcnv2, e.g. 400,400,400")
    m.add_argument("--dropout", type=float, default=None)
    m.add_argument("--d-model", type=int, default=None, help="dgenctr: Transformer width")
    m.add_argument("--layers", type=int, default=None, help="dgenctr: Transformer layers")
    m.add_argument("--heads", type=int, default=None, help="dgenctr: attention heads")
    m.add_argument("--model-opt", action="append", type=_kv_option, default=[], metavar="KEY=VALUE",
                   help="any other field of the model's config dataclass (repeatable), e.g. readout=concat")

    d = p.add_argument_group("dgenctr stage 1 (masked diffusion pre-training)",
                             "a flag overrides the recipe's value; a key neither sets takes PretrainConfig's default (model/diffusion.py)")
    d.add_argument("--pretrain-mode", choices=["full", "body", "embedding", "none"], default=None,
                   help="full: transfer every tensor; body: all but the label head; embedding: embedding table only; "
                   "none: no pre-training")
    d.add_argument("--transfer-lr-scale", type=float, default=None,
                   help="stage-2 LR multiplier for the network tensors transferred from stage 1 (e.g. 0.1); "
                   "the embedding table keeps the full LR")
    d.add_argument("--transfer-keep", type=float, default=None, metavar="K",
                   help="share of each transferred tensor kept, the rest being the fresh initialisation (shrink and "
                   "perturb; 1: plain transfer, 0: the from-scratch network)")
    d.add_argument("--embedding-l2-anchor", choices=["zero", "pretrained"], default=None,
                   help="where --embedding-l2 pulls the table in stage 2: zero, or the pre-trained table (L2-SP)")
    d.add_argument("--aux-weight", type=float, default=None,
                   help="keep stage 1's masked-field loss in stage 2 at this weight (joint fine-tuning; 0: off)")
    d.add_argument("--aux-rows", type=int, default=None, help="rows of each batch the auxiliary loss sees (0: all)")
    d.add_argument("--pretrain-epochs", type=int, default=None)
    d.add_argument("--pretrain-batch-size", type=int, default=None)
    d.add_argument("--pretrain-lr", type=float, default=None, help="AdamW learning rate")
    d.add_argument("--schedule", choices=["linear", "cosine"], default=None, help="mask probability lambda(t)")
    d.add_argument("--tau", type=float, default=None, help="temperature of the cosine sampled softmax")
    d.add_argument("--num-negatives", type=int, default=None, help="in-batch candidates per masked field")
    d.add_argument("--no-label-mask", action="store_true", help="never mask the label in pre-training (ablation)")
    d.add_argument("--label-weight", type=float, default=None,
                   help="weight of a masked label's cross-entropy against one field's reconstruction loss")
    d.add_argument("--pretrained", default=None, help="reuse a stage-1 checkpoint (RUN_DIR/pretrained.safetensors)")
    p.set_defaults(handler=_train)


# flag (argparse dest) -> recipe key. A flag left out (None) is not applied, so a value lives
# once: in the recipe, or else in its config dataclass.
RUN_FLAGS = {"model": "model_type", "spec": "spec", "data": "data", "seed": "seed", "pretrain_mode": "pretrain_mode",
             "transfer_lr_scale": "transfer_lr_scale", "transfer_keep": "transfer_keep",
             "embedding_l2_anchor": "embedding_l2_anchor", "aux_weight": "aux_weight", "aux_rows": "aux_rows",
             "field_mask_rate": "field_mask_rate", "calibration": "calibration", "pretrained": "pretrained",
             "max_rows": "max_rows", "threads": "threads"}
TRAIN_FLAGS = {"epochs": "epochs", "batch_size": "batch_size", "lr": "lr", "weight_decay": "weight_decay",
               "embedding_l2": "embedding_l2", "patience": "patience", "lr_patience": "lr_patience",
               "max_steps_per_epoch": "max_steps_per_epoch", "lr_decay_epochs": "lr_decay_epochs", "ema_decay": "ema_decay",
               "ema_epochs": "ema_epochs", "lr_decay": "lr_decay"}
PRETRAIN_FLAGS = {"pretrain_epochs": "epochs", "pretrain_batch_size": "batch_size", "pretrain_lr": "lr", "schedule": "schedule",
                  "tau": "tau", "num_negatives": "num_negatives", "label_weight": "label_weight"}
MODEL_FLAGS = {"embedding_dim": "embedding_dim", "dropout": "dropout", "d_model": "d_model", "layers": "layers", "heads": "heads"}


def _given(args: argparse.Namespace, flags: dict[str, str]) -> dict[str, Any]:
    """{recipe key: value} for the flags the user set."""
    return {key: getattr(args, flag) for flag, key in flags.items() if getattr(args, flag, None) is not None}


def apply_flags(raw: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """The recipe dict with the flags the user set written over it."""
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    raw.update(_given(args, RUN_FLAGS))
    model = dict(raw.get("model") or {})
    model.update(dict(getattr(args, "model_opt", []) or []))
    if getattr(args, "hidden", None) is not None:
        model["hidden"] = [int(x) for x in str(args.hidden).split(",") if x.strip()]
    model.update(_given(args, MODEL_FLAGS))
    train = {**(raw.get("train") or {}), **_given(args, TRAIN_FLAGS)}
    if getattr(args, "no_progress", False):
        train["progress"] = False
    pretrain = {**(raw.get("pretrain") or {}), **_given(args, PRETRAIN_FLAGS)}
    if getattr(args, "no_label_mask", False):
        pretrain["mask_label"] = False
    for key, section in (("model", model), ("train", train), ("pretrain", pretrain)):
        if section or key in raw:
            raw[key] = section
    return raw


def build_run_config(args: argparse.Namespace, base: dict[str, Any] | None = None,
                     where: str = "ctr train"):  # -> model.pipeline.RunConfig
    """`base` (a recipe's keys; none: every dataclass default) with the flags, then `--set`, over it.
    `where` names the recipe in error messages."""
    from model import run_config as recipes

    raw = apply_flags(dict(base or {}), args)
    for text in getattr(args, "overrides", []) or []:
        key, value = recipes.parse_set(text)
        recipes.assign(raw, key, value, where=f"--set {text}")
    return recipes.to_run_config(raw, args.out, where)


def resolve_recipe(args: argparse.Namespace) -> tuple[dict[str, Any], str | None]:
    """The recipe a `ctr train` command starts from and its file: --config, or else the shipped
    recommendation for the spec's data set and the model (none for a model without one)."""
    from model import run_config as recipes

    if args.config:
        path = recipes.find_recipe(args.config)
        return recipes.load(path), str(path)
    if args.model is None:
        raise ValueError("give --model (or --config with a recipe that names model_type)")
    if args.spec is None:
        raise ValueError("give --spec (or --config with a recipe that names the spec)")
    path = recipes.default_recipe(recipes.dataset_of(args.spec), args.model)
    return (recipes.load(path), str(path)) if path else ({}, None)


def _train(args: argparse.Namespace) -> int:
    if args.model is not None and args.model not in MODEL_CHOICES:
        raise ValueError(f"unknown model '{args.model}' (choose from {', '.join(MODEL_CHOICES)})")
    import logging

    from model.pipeline import train_run
    from model.trainer import init_distributed

    base, source = resolve_recipe(args)
    cfg = build_run_config(args, base, where=f"{source} with the flags" if source else "ctr train")
    ctx = init_distributed()
    if ctx.is_main:
        logging.getLogger(__name__).info("recipe file=%s set=%s", source, ",".join(args.overrides) or "-")
    metrics = train_run(cfg, ctx, recipe={"file": source, "set": list(args.overrides)})
    if ctx.is_main:
        summary = {k: metrics[k] for k in ("model", "variant", "valid", "test", "train_seconds")}
        print(json.dumps(summary, indent=2))
    if ctx.distributed:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return 0
