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
        "Also runs under `torchrun --nproc_per_node=N -m ctr train ...` (DDP).",
    )
    p.add_argument("--spec", required=True, help="spec file or shipped name (synthetic, frappe_x1, criteo_sample)")
    p.add_argument("--data", required=True, help="directory with train/valid/test splits (csv or parquet)")
    p.add_argument("--model", required=True, help=f"one of {', '.join(MODEL_CHOICES)}")
    p.add_argument("--out", required=True, help="run directory to write")
    p.add_argument("--seed", type=int, default=2024)

    t = p.add_argument_group("training (stage 2 for dgenctr)", "a flag left out takes TrainConfig's default (model/trainer.py)")
    t.add_argument("--epochs", type=int, default=None, help="max epochs; early stopping usually ends sooner")
    t.add_argument("--batch-size", type=int, default=None, help="default 1024 for dgenctr, 4096 for the baselines")
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
    t.add_argument("--field-mask-rate", type=float, default=0.0,
                   help="replace each field by its [MASK] with this probability while training (input dropout; 0: off)")
    t.add_argument("--calibration", choices=["platt", "none"], default="platt",
                   help="post-hoc calibration fitted on the validation logits (the exported model scores with it; "
                        "metrics.json keeps the raw numbers and adds 'calibrated')")
    t.add_argument("--max-steps-per-epoch", type=int, default=None, help="cap steps per epoch (smoke runs); 0 = all")
    t.add_argument("--max-rows", type=int, default=None, help="use only the first N rows of each split")
    t.add_argument("--threads", type=int, default=0, help="torch threads per process (0: cores / processes)")
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

    d = p.add_argument_group("dgenctr stage 1 (masked diffusion pre-training)", "a flag left out takes PretrainConfig's default (model/diffusion.py)")
    d.add_argument("--pretrain-mode", choices=["full", "body", "embedding", "none"], default="full",
                   help="full: transfer every tensor; body: all but the label head; embedding: embedding table only; "
                   "none: no pre-training")
    d.add_argument("--transfer-lr-scale", type=float, default=1.0,
                   help="stage-2 LR multiplier for the network tensors transferred from stage 1 (e.g. 0.1); "
                   "the embedding table keeps the full LR")
    d.add_argument("--transfer-keep", type=float, default=1.0, metavar="K",
                   help="share of each transferred tensor kept, the rest being the fresh initialisation (shrink and "
                   "perturb; 1: plain transfer, 0: the from-scratch network)")
    d.add_argument("--embedding-l2-anchor", choices=["zero", "pretrained"], default="zero",
                   help="where --embedding-l2 pulls the table in stage 2: zero, or the pre-trained table (L2-SP)")
    d.add_argument("--aux-weight", type=float, default=0.0,
                   help="keep stage 1's masked-field loss in stage 2 at this weight (joint fine-tuning; 0: off)")
    d.add_argument("--aux-rows", type=int, default=256, help="rows of each batch the auxiliary loss sees (0: all)")
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


def _given(args: argparse.Namespace, flags: dict[str, str]) -> dict[str, Any]:
    """{config field: value} for the flags the user set. A flag left out (None) is not passed,
    so each default lives once, in its config dataclass, and the CLI cannot drift from it."""
    return {field: getattr(args, flag) for flag, field in flags.items() if getattr(args, flag) is not None}


def build_run_config(args: argparse.Namespace):  # -> model.pipeline.RunConfig
    from model.diffusion import PretrainConfig
    from model.pipeline import RunConfig
    from model.trainer import TrainConfig

    overrides: dict[str, Any] = dict(args.model_opt)
    if args.hidden is not None:
        overrides["hidden"] = [int(x) for x in str(args.hidden).split(",") if x.strip()]
    overrides.update(_given(args, {"embedding_dim": "embedding_dim", "dropout": "dropout", "d_model": "d_model",
                                   "layers": "layers", "heads": "heads"}))
    batch_size = args.batch_size or (1024 if args.model == "dgenctr" else 4096)
    train = TrainConfig(
        **_given(args, {"epochs": "epochs", "lr": "lr", "weight_decay": "weight_decay", "embedding_l2": "embedding_l2",
                        "patience": "patience", "lr_patience": "lr_patience", "max_steps_per_epoch": "max_steps_per_epoch",
                        "lr_decay_epochs": "lr_decay_epochs", "ema_decay": "ema_decay", "ema_epochs": "ema_epochs",
                        "lr_decay": "lr_decay"}),
        batch_size=batch_size, seed=args.seed, progress=not args.no_progress,
    )
    pre = PretrainConfig(
        **_given(args, {"pretrain_epochs": "epochs", "pretrain_batch_size": "batch_size", "pretrain_lr": "lr",
                        "schedule": "schedule", "tau": "tau", "num_negatives": "num_negatives", "label_weight": "label_weight"}),
        mask_label=not args.no_label_mask,
    )
    return RunConfig(
        model_type=args.model, spec=args.spec, data=args.data, out=args.out, seed=args.seed, model=overrides,
        train=train, pretrain=pre, pretrain_mode=args.pretrain_mode, pretrained=args.pretrained,
        transfer_lr_scale=args.transfer_lr_scale, transfer_keep=args.transfer_keep, embedding_l2_anchor=args.embedding_l2_anchor,
        aux_weight=args.aux_weight, aux_rows=args.aux_rows, field_mask_rate=args.field_mask_rate,
        calibration=args.calibration, max_rows=args.max_rows, threads=args.threads,
    )


def _train(args: argparse.Namespace) -> int:
    if args.model not in MODEL_CHOICES:
        raise ValueError(f"unknown model '{args.model}' (choose from {', '.join(MODEL_CHOICES)})")
    from model.pipeline import train_run
    from model.trainer import init_distributed

    ctx = init_distributed()
    metrics = train_run(build_run_config(args), ctx)
    if ctx.is_main:
        summary = {k: metrics[k] for k in ("model", "variant", "valid", "test", "train_seconds")}
        print(json.dumps(summary, indent=2))
    if ctx.distributed:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return 0
