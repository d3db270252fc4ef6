"""One training run end to end: data -> (stage 1) -> stage 2 / supervised -> metrics -> run dir.

`ctr train` and the quality benchmark both call `train_run` with a `RunConfig` resolved from the
same recipe files (model/run_config.py), so a benchmark number is exactly what a user gets from
`ctr train --config` with that recipe. The stages are separate functions (prepare, stage one,
the stage-2 network, fine-tuning, evaluation, saving) so each can be read and tested alone;
their order of seeding is what makes a seeded run repeat bit for bit.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.calibration import CALIBRATION_METHODS, PlattScaling, fit_platt
from model.data import EncodedSplit, load_encoded
from model.metrics import evaluate
from model.diffusion import FineTuneObjective, PretrainConfig, PretrainObjective, reconstruction_report
from model.logs import kv
from model.networks import MODELS, build_model, model_config
from model.readers import DataError
from model.readers import data_fingerprint
from model.run_io import save_run, save_weights
from model.spec import FeatureSpec
from model.trainer import (BCEObjective, DistContext, FitResult, TrainConfig, fit_supervised, init_distributed, run_fixed_epochs,
                           seed_everything, set_threads, split_logits)
from model.transfer import MODE_OF_PRETRAIN, warm_start

log = logging.getLogger(__name__)

PRETRAIN_MODES = ("full", "body", "embedding", "none")


@dataclass
class RunConfig:
    model_type: str
    spec: str
    data: str
    out: str
    seed: int = 2024
    model: dict[str, Any] = field(default_factory=dict)  # overrides of the network's config dataclass
    train: TrainConfig = field(default_factory=TrainConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    # DGenCTR only. "full": stage 1 then transfer every tensor; "body": all but the label head,
    # which starts fresh; "embedding": transfer only the embedding table; "none": the same
    # network trained from scratch (ablations).
    pretrain_mode: str = "full"
    # Stage-2 LR multiplier for the network tensors taken over from stage 1 (1 = one LR for
    # all; < 1 fine-tunes them more gently than the parts that start fresh). The embedding
    # table keeps the full LR: its L2 penalty works through Adam steps of about one LR, and at
    # a tenth of it the penalty on a pre-trained table outweighs the click loss for epochs.
    transfer_lr_scale: float = 1.0
    # Share of each transferred tensor kept; the rest is the fresh network's initialisation
    # ("shrink and perturb", model/transfer.py `shrink_toward`). 1: the plain transfer;
    # 0: the same network as from scratch.
    transfer_keep: float = 1.0
    # Where stage 2's embedding L2 pulls the table: "zero" (FuxiCTR's regulariser) or
    # "pretrained" (L2-SP: towards the transferred table, so the penalty does not erase it).
    embedding_l2_anchor: str = "zero"
    # DGenCTR only: weight of stage 1's masked-field loss kept as an auxiliary in stage 2 (0: off),
    # computed on a second, diffusion-masked view of each batch's first `aux_rows` rows (0: all).
    aux_weight: float = 0.0
    aux_rows: int = 256
    # Probability that training replaces a field by its [MASK] (0: off): DGenCTR's stage 2 uses
    # the learned [MASK] embeddings of stage 1, a baseline its table's reserved MASK_ID row.
    # Scoring always sees every field.
    field_mask_rate: float = 0.0
    # Post-hoc calibration fitted on the validation logits after training ("none": off).
    # metrics.json's "valid"/"test" stay the raw network's (comparable with published numbers);
    # "calibrated" holds the fit and its metrics, and the exported model scores calibrated.
    calibration: str = "platt"
    pretrained: str | None = None  # a stage-1 checkpoint (safetensors) to reuse instead of running stage 1
    max_rows: int | None = None  # cap every split (smoke runs)
    threads: int = 0  # torch threads per rank; 0 = cores / ranks

    @property
    def transfers(self) -> bool:
        """Whether stage 2 takes over a stage 1 (the flags that tune the takeover need one)."""
        return self.model_type == "dgenctr" and self.pretrain_mode != "none"

    def _base_variant(self) -> str:
        if self.model_type != "dgenctr":
            return self.model_type
        if self.pretrain_mode == "none":
            return "dgenctr-scratch"
        if self.pretrain_mode == "embedding":
            return "dgenctr-emb-only"
        if self.pretrain_mode == "body":
            return "dgenctr-new-head"
        return "dgenctr" if self.pretrain.mask_label else "dgenctr-no-label"

    def variant(self) -> str:
        """The benchmark's name for this run: the model, its transfer mode, `-shrink` for a transfer
        blended with the fresh initialisation, `-aux` for a joint stage 2, `-fmask` for a
        field-masked one and `-ema` for one that keeps a weight average."""
        return (self._base_variant() + ("-shrink" if self.transfer_keep < 1 else "") + ("-aux" if self.aux_weight > 0 else "")
                + ("-fmask" if self.field_mask_rate > 0 else "")
                + ("-ema" if self.train.ema_decay > 0 or self.train.ema_epochs > 0 else ""))


def validate(cfg: RunConfig) -> None:
    """Refuse a bad run before any data is read, with a message that names the problem."""
    if cfg.model_type not in MODELS:
        raise ValueError(f"unknown model '{cfg.model_type}' (choose from {', '.join(MODELS)})")
    if cfg.pretrain_mode not in PRETRAIN_MODES:
        raise ValueError(f"unknown pretrain mode '{cfg.pretrain_mode}' (choose from {', '.join(PRETRAIN_MODES)})")
    if cfg.transfer_lr_scale < 0 or (cfg.transfer_lr_scale != 1.0 and not cfg.transfers):
        raise ValueError(f"transfer_lr_scale {cfg.transfer_lr_scale} needs a DGenCTR run that transfers stage 1 (and a scale >= 0)")
    if not 0 <= cfg.transfer_keep <= 1 or (cfg.transfer_keep != 1.0 and not cfg.transfers):
        raise ValueError(f"transfer_keep {cfg.transfer_keep} needs a DGenCTR run that transfers stage 1 (and a value in [0, 1])")
    if cfg.embedding_l2_anchor not in ("zero", "pretrained"):
        raise ValueError(f"unknown embedding_l2_anchor '{cfg.embedding_l2_anchor}' (zero or pretrained)")
    if cfg.embedding_l2_anchor == "pretrained" and not cfg.transfers:
        raise ValueError("embedding_l2_anchor 'pretrained' needs a DGenCTR run that transfers stage 1's embedding table")
    if cfg.aux_weight < 0 or cfg.aux_rows < 0 or (cfg.aux_weight > 0 and cfg.model_type != "dgenctr"):
        raise ValueError(f"aux_weight {cfg.aux_weight} (rows {cfg.aux_rows}) needs a DGenCTR run and values >= 0")
    if cfg.calibration not in CALIBRATION_METHODS:
        raise ValueError(f"unknown calibration '{cfg.calibration}' (choose from {', '.join(CALIBRATION_METHODS)})")
    if not 0 <= cfg.train.ema_decay < 1:
        raise ValueError(f"ema_decay {cfg.train.ema_decay} must be in [0, 1)")
    if cfg.train.ema_epochs < 0 or (cfg.train.ema_epochs > 0 and cfg.train.ema_decay > 0):
        raise ValueError(f"ema_epochs {cfg.train.ema_epochs} must be >= 0 and not given with ema_decay (one or the other)")
    if not 0 <= cfg.field_mask_rate < 1:
        raise ValueError(f"field_mask_rate {cfg.field_mask_rate} must be in [0, 1)")
    if not 0 < cfg.train.lr_decay <= 1:
        raise ValueError(f"lr_decay {cfg.train.lr_decay} must be in (0, 1] (1: a constant LR)")
    decays = cfg.train.lr_decay_epochs
    if decays and cfg.train.lr_decay == 1:
        raise ValueError("lr_decay_epochs needs an lr_decay below 1")
    if decays and (decays[-1] >= cfg.train.epochs or cfg.train.lr_patience > 0):
        raise ValueError(f"lr_decay_epochs {decays} must all come before the last epoch ({cfg.train.epochs}) "
                         "and replace the plateau decay (no lr_patience)")
    if not Path(cfg.data).is_dir():
        raise DataError(f"data directory not found: {cfg.data}")
    if cfg.pretrained and not Path(cfg.pretrained).exists():
        raise DataError(f"pre-trained checkpoint not found: {cfg.pretrained}")
    model_config(cfg.model_type, cfg.model)  # unknown model options fail here


def _pretrain_loop_config(cfg: RunConfig) -> TrainConfig:
    p = cfg.pretrain
    return dataclasses.replace(
        cfg.train, epochs=p.epochs, batch_size=p.batch_size, lr=p.lr, weight_decay=p.weight_decay, seed=cfg.seed + 1
    )


@dataclass
class Prepared:
    """What every stage of a run shares: the encoded splits, the network's config, the ranks."""

    spec: FeatureSpec
    splits: dict[str, EncodedSplit]
    model_cfg: Any
    ctx: DistContext
    threads: int
    start: float  # perf_counter() when the run began; train_seconds counts from here

    def build(self, cfg: RunConfig) -> torch.nn.Module:
        """A fresh network, seeded as a from-scratch run seeds it, so every stage-2 network
        (scratch or warm-started) starts from the same initialisation."""
        seed_everything(cfg.seed)
        return build_model(cfg.model_type, self.model_cfg, self.spec.vocab_sizes)


@dataclass
class Evaluation:
    metrics: dict[str, Any]  # metrics.json's content
    calibration: PlattScaling | None


def prepare(cfg: RunConfig, ctx: DistContext | None = None) -> Prepared:
    """Refuse a bad config, join the ranks, and read and encode the splits."""
    validate(cfg)
    ctx = ctx or init_distributed()
    threads = set_threads(ctx, cfg.threads)
    seed_everything(cfg.seed)
    start = time.perf_counter()
    spec, splits = load_encoded(FeatureSpec.load(cfg.spec), cfg.data, max_rows=cfg.max_rows)
    prep = Prepared(spec, splits, model_config(cfg.model_type, cfg.model), ctx, threads, start)
    if ctx.is_main:
        log.info("train_start %s", kv(model=cfg.variant(), seed=cfg.seed, ranks=ctx.world, threads=threads,
                                       train_rows=len(splits["train"]), fields=spec.num_fields))
    return prep


def pretrain(model: torch.nn.Module, spec: FeatureSpec, splits: dict, cfg: RunConfig, ctx: DistContext) -> dict[str, Any]:
    """Stage 1 on the train split only; logs per-field reconstruction accuracy each epoch."""
    objective = PretrainObjective(model, cfg.pretrain, seed=cfg.seed * 7919 + ctx.rank)
    names = spec.field_names + ["label"]
    per_epoch: list[dict[str, Any]] = []

    def on_epoch_end(epoch: int, out: dict[str, Any]) -> None:
        st = out["stats"]
        acc = (st["correct"] / st["masked"].clamp(min=1)).tolist()
        row = {"epoch": epoch + 1, "loss": out["loss"], "seconds": out["seconds"], "in_batch_accuracy": dict(zip(names, acc))}
        per_epoch.append(row)
        if ctx.is_main:
            log.info("pretrain_epoch %s", kv(epoch=epoch + 1, loss=out["loss"], seconds=round(out["seconds"], 1),
                                              **{f"acc_{n}": round(a, 3) for n, a in zip(names, acc)}))

    t0 = time.perf_counter()
    run_fixed_epochs(objective, list(model.parameters()), splits["train"], _pretrain_loop_config(cfg), ctx, "pretrain", on_epoch_end)
    seconds = time.perf_counter() - t0
    valid = splits["valid"].head(8192)
    report = reconstruction_report(model, valid.tokens, valid.labels, spec.field_names, cfg.pretrain.schedule, seed=cfg.seed)
    if ctx.is_main:
        for name, r in report.items():
            log.info("reconstruction %s", kv(field=name, accuracy=round(r["accuracy"], 4), majority=round(r["majority"], 4), masked=r["masked"]))
    return {"epochs": per_epoch, "valid_reconstruction": report, "seconds": seconds}


def stage_one(cfg: RunConfig, prep: Prepared) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The stage-1 weights (from `cfg.pretrained`, or trained here and saved beside the run)
    and what `metrics.json` records about them."""
    if cfg.pretrained:
        from safetensors.torch import load_file

        return load_file(cfg.pretrained), {"checkpoint": str(cfg.pretrained)}
    ctx = prep.ctx
    model = prep.build(cfg).to(ctx.device)
    seed_everything(cfg.seed + ctx.rank)
    info = pretrain(model, prep.spec, prep.splits, cfg, ctx)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    if ctx.is_main:
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        save_weights(model, Path(cfg.out) / "pretrained.safetensors")
    return state, info


def stage_two_network(cfg: RunConfig, prep: Prepared, pretrained: dict[str, torch.Tensor] | None) -> tuple[torch.nn.Module, list[str]]:
    """The network stage 2 (or a supervised run) trains: built fresh, then warm-started from
    `pretrained` when given (model/transfer.py). Returns it and the names taken over."""
    model = prep.build(cfg)
    copied = warm_start(pretrained, model, MODE_OF_PRETRAIN[cfg.pretrain_mode], cfg.transfer_keep) if pretrained is not None else []
    return model.to(prep.ctx.device), copied


def fine_tune(cfg: RunConfig, prep: Prepared, model: torch.nn.Module, copied: list[str]) -> FitResult:
    """Stage 2 (or the supervised run): click loss, early stopping on valid AUC, best weights kept."""
    ctx = prep.ctx
    anchor = model.embedding.table.weight.detach().clone() if cfg.embedding_l2_anchor == "pretrained" else None
    objective = None
    mask_seed = cfg.seed * 7919 + 1 + ctx.rank
    if cfg.model_type == "dgenctr" and (cfg.aux_weight > 0 or cfg.field_mask_rate > 0):
        objective = FineTuneObjective(model, cfg.pretrain, seed=mask_seed, field_mask_rate=cfg.field_mask_rate,
                                      aux_weight=cfg.aux_weight, aux_rows=cfg.aux_rows)
    elif cfg.field_mask_rate > 0:
        objective = BCEObjective(model, cfg.field_mask_rate, seed=mask_seed)
    seed_everything(cfg.seed + ctx.rank)  # dropout streams differ per rank; weights are DDP-broadcast
    return fit_supervised(model, prep.splits["train"], prep.splits["valid"], cfg.train, ctx,
                          stage="finetune" if cfg.transfers else "train", objective=objective,
                          scaled=[k for k in copied if not k.startswith("embedding.")], lr_scale=cfg.transfer_lr_scale,
                          embedding_anchor=anchor)


def evaluate_run(cfg: RunConfig, prep: Prepared, model: torch.nn.Module, fit: FitResult, train_seconds: float,
                 pre_info: dict[str, Any] | None) -> Evaluation:
    """Valid and test metrics of the trained network, raw and after a Platt fit on valid."""
    splits, ctx = prep.splits, prep.ctx
    logits = {s: split_logits(model, splits[s], ctx, cfg.train.eval_batch_size) for s in ("valid", "test") if s in splits}
    valid_m = _metrics(splits["valid"], logits["valid"])
    test_m = _metrics(splits["test"], logits["test"]) if "test" in logits else {}
    calibration = fit_platt(logits["valid"], splits["valid"].labels.numpy()) if cfg.calibration == "platt" else None
    metrics: dict[str, Any] = {
        "model": cfg.model_type,
        "variant": cfg.variant(),
        "valid": valid_m,
        "test": test_m,
        "train_seconds": train_seconds,
        "seed": cfg.seed,
        "best_epoch": fit.best_epoch,
        "world_size": ctx.world,
        "history": fit.history,
    }
    if pre_info is not None:
        metrics["pretrain"] = pre_info
    if calibration is not None:
        metrics["calibrated"] = {**calibration.to_dict(),
                                 **{s: _metrics(splits[s], logits[s], calibration) for s in logits}}
    return Evaluation(metrics, calibration)


def resolved(cfg: RunConfig, prep: Prepared) -> dict[str, Any]:
    """The run's full config as `ctr train --config` reads it back: every dataclass field, the
    model's options all spelt out, the data directory absolute. `out` is left out, so a rerun
    from it has to name a new run directory."""
    run = asdict(cfg)
    run.pop("out")
    run["model"] = asdict(prep.model_cfg)
    run["data"] = str(Path(cfg.data).resolve())
    return run


def save(cfg: RunConfig, prep: Prepared, model: torch.nn.Module, result: Evaluation,
         recipe: dict[str, Any] | None = None) -> None:
    """Write the run directory (rank 0 only). config.json's `run` is `resolved(cfg)`; its other
    keys are what `load_run`, export and older readers take from it."""
    ctx, splits, calibration, metrics = prep.ctx, prep.splits, result.calibration, result.metrics
    if not ctx.is_main:
        return
    config = {
        "model_type": cfg.model_type,
        "model": asdict(prep.model_cfg),
        "train": {**asdict(cfg.train), "seed": cfg.seed, "pretrain_mode": cfg.pretrain_mode,
                  "transfer_lr_scale": cfg.transfer_lr_scale, "transfer_keep": cfg.transfer_keep,
                  "embedding_l2_anchor": cfg.embedding_l2_anchor,
                  "aux_weight": cfg.aux_weight, "aux_rows": cfg.aux_rows,
                  "field_mask_rate": cfg.field_mask_rate,
                  "pretrain": asdict(cfg.pretrain) if cfg.model_type == "dgenctr" else None, "world_size": ctx.world},
        "data": {"dir": str(Path(cfg.data).resolve()), "spec": cfg.spec, "rows": {s: len(e) for s, e in splits.items()},
                 "max_rows": cfg.max_rows, "fingerprint": data_fingerprint(cfg.data)},
        "variant": cfg.variant(),
        "calibration": None if calibration is None else calibration.to_dict(),
        "run": resolved(cfg, prep),
        "recipe": recipe,
    }
    save_run(cfg.out, model.cpu(), prep.spec, config, metrics)
    test_m = metrics["test"]
    log.info("train_done %s", kv(model=cfg.variant(), out=cfg.out, valid_auc=metrics["valid"]["auc"], test_auc=test_m.get("auc"),
                                  test_logloss=test_m.get("logloss"),
                                  calibrated_test_logloss=metrics.get("calibrated", {}).get("test", {}).get("logloss"),
                                  seconds=round(metrics["train_seconds"], 1)))


def train_run(cfg: RunConfig, ctx: DistContext | None = None, recipe: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train, evaluate, and (on rank 0) write the run directory. Returns metrics.json's content.

    `recipe` (the file and the `--set` overrides the config was resolved from) goes into
    config.json as provenance; it does not change the run.
    """
    prep = prepare(cfg, ctx)
    pretrained, pre_info = stage_one(cfg, prep) if cfg.transfers else (None, None)
    model, copied = stage_two_network(cfg, prep, pretrained)
    if pre_info is not None:
        pre_info["transferred_tensors"] = len(copied)
    fit = fine_tune(cfg, prep, model, copied)
    train_seconds = time.perf_counter() - prep.start
    result = evaluate_run(cfg, prep, model, fit, train_seconds, pre_info)
    save(cfg, prep, model, result, recipe)
    return result.metrics


def _metrics(split: EncodedSplit, logits: np.ndarray, calibration: PlattScaling | None = None) -> dict[str, float]:
    """In float32 torch, as `Calibrated` and the exported graph compute it, so the numbers here
    are the served model's (float64 would un-saturate probabilities that serving rounds to 1)."""
    z = torch.from_numpy(np.asarray(logits, dtype=np.float32))
    if calibration is not None:
        z = z * torch.tensor(calibration.scale, dtype=torch.float32) + torch.tensor(calibration.bias, dtype=torch.float32)
    return evaluate(split.labels.numpy(), torch.sigmoid(z).numpy(), split.groups)
