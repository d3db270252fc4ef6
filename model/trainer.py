"""The training loop every model shares: seeded epochs, early stopping, LR decay and DDP.

One loop trains DNN, DeepFM, DCNv2 and both DGenCTR stages, so a benchmark difference is
only about the model. The loop optimises an *objective* module (`forward(tokens, labels) ->
(loss, stats)`), which is what gets wrapped in DistributedDataParallel: a diffusion loss
that calls the generator heads directly still synchronises every gradient.

Under `torchrun` each rank walks its shard of the same seeded permutation, validation
predictions are gathered from all ranks, and rank 0's early-stopping decision is broadcast,
so every rank stops at the same epoch with the same best weights.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from model.data import EncodedSplit, epoch_batches
from model.spec import MASK_ID
from model.logs import kv
from model.metrics import evaluate

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Stage-2 / supervised settings (FuxiCTR conventions: early stop on valid AUC, LR /10 on plateau)."""

    epochs: int = 30
    batch_size: int = 4096
    lr: float = 1e-3
    weight_decay: float = 0.0
    # FuxiCTR's embedding_regularizer: adds embedding_l2 / 2 * ||E||^2 over the whole table each step
    # (BARS tunes Frappe baselines with 0.05 or 0.1; it matters more than most network choices).
    embedding_l2: float = 0.0
    patience: int = 2  # epochs without a valid-AUC gain before stopping
    lr_decay: float = 0.1  # the factor each decay multiplies the LR by; 1: never decay
    lr_patience: int = 0  # 0: divide the LR on the first epoch without a gain (FuxiCTR)
    # Divide the LR after these epochs instead of on a plateau (empty: plateau). A plateau
    # decay fires on one noisy epoch, so on slow learners (field-masked DGenCTR) it moved the
    # best epoch by up to ten between seeds; a fixed schedule takes that noise out. Only epochs
    # after the last of them count towards `patience`, so the schedule always runs.
    lr_decay_epochs: list[int] = field(default_factory=list)
    min_lr: float = 1e-6
    # Per-step decay of an exponential moving average of the weights (0: off). When on, the
    # average is what validation scores, what early stopping keeps and what the run exports:
    # field-masked training takes noisy steps, and an average over the last ~1/(1-decay) steps
    # smooths that noise out of the weights; the optimiser still steps the raw ones. Its
    # buffers (BatchNorm statistics) are averaged too, so the model stays self-consistent.
    ema_decay: float = 0.0
    # The same average given as a horizon in epochs (0: use ema_decay). The per-step decay is
    # then 1 - 1 / (ema_epochs * steps per epoch), so one value carries across batch sizes and
    # dataset sizes; a per-step decay has to be re-tuned for each. Both tenth-round recipes are
    # a one-epoch horizon: 0.995 at 197 steps of 1024 rows, 0.98 at 49 steps of 4096.
    ema_epochs: float = 0.0
    grad_clip: float = 10.0
    eval_batch_size: int = 16384
    max_steps_per_epoch: int = 0  # 0: the whole split; >0 caps an epoch (tests, smoke runs)
    seed: int = 2024
    progress: bool = True


@dataclass
class DistContext:
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def init_distributed() -> DistContext:
    """Join the process group when launched by torchrun (gloo on CPU, nccl on GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device, backend = torch.device("cuda", local), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return DistContext(rank=rank, world=world, device=device)


def set_threads(ctx: DistContext, threads: int = 0) -> int:
    """Split the machine's cores across ranks: oversubscribed BLAS threads thrash."""
    n = threads or max(1, (os.cpu_count() or 1) // ctx.world)
    torch.set_num_threads(n)
    return n


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------- objectives
class BCEObjective(nn.Module):
    """Click loss on `model(tokens)`: every baseline, and DGenCTR stage 2 (label masked in forward).

    `field_mask_rate` p > 0 is the baselines' side of DGenCTR's field-masked stage 2
    (`FineTuneObjective`): while training, each field's token becomes its reserved [MASK] id
    with probability p, so the shared table learns a per-field "missing" row just as DGenCTR
    learns its [MASK] embeddings. Without it, a DGenCTR gain from masking could not be told
    apart from plain input dropout, which any network can have. Scoring never sees MASK_ID.
    """

    def __init__(self, model: nn.Module, field_mask_rate: float = 0.0, seed: int = 0) -> None:
        super().__init__()
        self.model = model
        self.field_mask_rate = field_mask_rate
        self.generator = torch.Generator().manual_seed(seed)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.field_mask_rate > 0:
            mask = torch.rand(tokens.shape, generator=self.generator) < self.field_mask_rate
            tokens = tokens.masked_fill(mask.to(tokens.device), MASK_ID)
        loss = F.binary_cross_entropy_with_logits(self.model(tokens), labels)
        return loss, {}


def _embedding_penalty(model: nn.Module, anchor: torch.Tensor | None = None) -> torch.Tensor:
    """1/2 ||E - anchor||^2 over the whole table (anchor None: towards zero, FuxiCTR's regulariser).

    Under Adam a penalty towards zero moves every row, untouched ones included, by about one LR
    towards zero each step, so it can erase a transferred table faster than the data moves it.
    Anchoring it at the pre-trained table (L2-SP) regularises fine-tuning without that. On
    Frappe_x1 the anchor held the table too close to stage 1's (docs/results.md, #44).
    """
    emb = getattr(model, "embedding", None)
    if emb is None:
        return torch.zeros(())
    weight = emb.table.weight
    return 0.5 * (weight if anchor is None else weight - anchor).pow(2).sum()


# ---------------------------------------------------------------------- inference
@torch.no_grad()
def predict_logits(model: nn.Module, tokens: torch.Tensor, batch_size: int = 16384, device: torch.device | None = None) -> np.ndarray:
    """float32 logits; calibration is fitted on these, not on float32 probabilities, which
    saturate at 1.0 for logits above ~17 and would lose exactly the over-confident rows."""
    was_training = model.training
    model.eval()
    out = []
    for chunk in torch.split(tokens, batch_size):
        if device is not None:
            chunk = chunk.to(device)
        out.append(model(chunk).float().cpu())
    model.train(was_training)
    return torch.cat(out).numpy() if out else np.empty(0, dtype=np.float32)


def predict(model: nn.Module, tokens: torch.Tensor, batch_size: int = 16384, device: torch.device | None = None) -> np.ndarray:
    return torch.sigmoid(torch.from_numpy(predict_logits(model, tokens, batch_size, device))).numpy()


def split_logits(model: nn.Module, split: EncodedSplit, ctx: DistContext, batch_size: int = 16384) -> np.ndarray:
    """Logits for a whole split; under DDP each rank predicts a contiguous shard and all gather."""
    n = len(split)
    if not ctx.distributed:
        return predict_logits(model, split.tokens, batch_size, ctx.device)
    per = -(-n // ctx.world)
    lo, hi = min(n, ctx.rank * per), min(n, (ctx.rank + 1) * per)
    local = torch.zeros(per, dtype=torch.float32)
    local[: hi - lo] = torch.from_numpy(predict_logits(model, split.tokens[lo:hi], batch_size, ctx.device))
    gathered = [torch.zeros(per, dtype=torch.float32) for _ in range(ctx.world)]
    if ctx.device.type == "cuda":
        local = local.to(ctx.device)
        gathered = [g.to(ctx.device) for g in gathered]
    dist.all_gather(gathered, local)
    return torch.cat([g.cpu() for g in gathered])[:n].numpy()


def evaluate_split(model: nn.Module, split: EncodedSplit, ctx: DistContext, batch_size: int = 16384, with_gauc: bool = True) -> dict[str, float]:
    probs = torch.sigmoid(torch.from_numpy(split_logits(model, split, ctx, batch_size))).numpy()
    return evaluate(split.labels.numpy(), probs, split.groups, with_gauc=with_gauc)


# ---------------------------------------------------------------------- the loop
def _wrap(objective: nn.Module, ctx: DistContext) -> nn.Module:
    if not ctx.distributed:
        return objective
    from torch.nn.parallel import DistributedDataParallel as DDP

    kwargs: dict[str, Any] = {"find_unused_parameters": True}
    if ctx.device.type == "cuda":
        kwargs["device_ids"] = [ctx.device.index]
    return DDP(objective, **kwargs)


def _all_reduce_sum(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    if ctx.distributed:
        t = t.to(ctx.device)
        dist.all_reduce(t)
        t = t.cpu()
    return t


def _broadcast_flag(flag: bool, ctx: DistContext) -> bool:
    if not ctx.distributed:
        return flag
    t = torch.tensor([1 if flag else 0], device=ctx.device)
    dist.broadcast(t, src=0)
    return bool(t.item())


def steps_per_epoch(rows: int, cfg: TrainConfig, ctx: DistContext) -> int:
    """Optimiser steps one rank takes per epoch (full batches only, as `run_epoch` draws them)."""
    steps = len(epoch_batches(rows, cfg.batch_size, cfg.seed, 0, ctx.rank, ctx.world, drop_last=True))
    return min(steps, cfg.max_steps_per_epoch) if cfg.max_steps_per_epoch else steps


def ema_decay_per_step(cfg: TrainConfig, steps: int) -> float:
    """The per-step EMA decay a config asks for: `ema_decay` as given, or `ema_epochs` turned into
    a decay whose horizon 1 / (1 - decay) is that many epochs of `steps` steps."""
    if cfg.ema_epochs > 0:
        return 1.0 - 1.0 / max(1.0, cfg.ema_epochs * steps)
    return cfg.ema_decay


def run_epoch(
    objective: nn.Module,
    optimizer: torch.optim.Optimizer,
    split: EncodedSplit,
    epoch: int,
    cfg: TrainConfig,
    ctx: DistContext,
    desc: str,
    embedding_model: nn.Module | None = None,
    after_step: Callable[[], None] | None = None,
    embedding_anchor: torch.Tensor | None = None,
) -> dict[str, Any]:
    """One pass over this rank's shard. Returns the mean loss and summed objective stats."""
    objective.train()
    batches = epoch_batches(len(split), cfg.batch_size, cfg.seed, epoch, ctx.rank, ctx.world, drop_last=True)
    if cfg.max_steps_per_epoch:
        batches = batches[: cfg.max_steps_per_epoch]
    total, steps = torch.zeros(()), 0
    stats_sum: dict[str, torch.Tensor] = {}
    bar = tqdm(batches, desc=desc, leave=False, disable=not (cfg.progress and ctx.is_main), unit="batch")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for idx in bar:
        tokens, labels = split.tokens[idx].to(ctx.device), split.labels[idx].to(ctx.device)
        loss, stats = objective(tokens, labels)
        if cfg.embedding_l2 > 0 and embedding_model is not None:
            loss = loss + cfg.embedding_l2 * _embedding_penalty(embedding_model, embedding_anchor)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        if after_step is not None:
            after_step()
        total += loss.detach().cpu()
        steps += 1
        for k, v in stats.items():
            stats_sum[k] = stats_sum.get(k, 0) + v.detach().cpu()
        if steps % 10 == 0:
            bar.set_postfix(loss=f"{float(total) / steps:.4f}")
    bar.close()
    summed = _all_reduce_sum(torch.stack([total, torch.tensor(float(steps))]), ctx)
    stats_sum = {k: _all_reduce_sum(v.clone(), ctx) for k, v in stats_sum.items()}
    return {"loss": float(summed[0] / max(summed[1], 1.0)), "steps": steps, "stats": stats_sum}


def param_groups(model: nn.Module, lr: float, scaled: Collection[str] = (), scale: float = 1.0) -> list[dict[str, Any]]:
    """Adam groups: the named parameters at `lr * scale`, the rest at `lr`.

    Fine-tuning can then move the tensors taken over from stage 1 more gently than the ones
    it starts fresh (discriminative fine-tuning), without a second optimiser or a schedule of
    its own: ReduceLROnPlateau divides every group alike.
    """
    named = list(model.named_parameters())
    scaled = set(scaled)
    unknown = scaled - {n for n, _ in named} - set(model.state_dict())
    if unknown:
        raise ValueError(f"no such parameters to scale: {sorted(unknown)[:5]}")
    if scale == 1.0:
        return [{"params": [p for _, p in named], "lr": lr}]
    fresh = [p for n, p in named if n not in scaled]
    kept = [p for n, p in named if n in scaled]
    return [{"params": ps, "lr": r} for ps, r in ((fresh, lr), (kept, lr * scale)) if ps]


class WeightAverage:
    """The EMA of a model's weights and float buffers, or the model itself when the decay is 0.

    One object for both cases keeps `fit_supervised` to one code path: it validates and keeps
    `scored`, and calls `update` after every optimiser step.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0 <= decay < 1:
            raise ValueError(f"ema_decay {decay} must be in [0, 1)")
        self.model = model
        self.average: nn.Module | None = None
        if decay > 0:
            from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

            self.average = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)

    @property
    def scored(self) -> nn.Module:
        return self.model if self.average is None else self.average.module

    def update(self) -> None:
        if self.average is not None:
            self.average.update_parameters(self.model)
            # AveragedModel lerps every buffer, integer ones included: FieldEmbedding.offsets
            # (int64) drifted by a row after one update, so the averaged model looked up the
            # wrong embedding rows. Counters and index tables are state, not weights: copy them.
            with torch.no_grad():
                for avg, live in zip(self.average.module.buffers(), self.model.buffers()):
                    if not avg.is_floating_point():
                        avg.copy_(live)


@dataclass
class FitResult:
    best_epoch: int
    best_valid: dict[str, float]
    history: list[dict[str, Any]]
    seconds: float


def fit_supervised(
    model: nn.Module,
    train: EncodedSplit,
    valid: EncodedSplit,
    cfg: TrainConfig,
    ctx: DistContext,
    stage: str = "train",
    objective: nn.Module | None = None,
    scaled: Collection[str] = (),
    lr_scale: float = 1.0,
    embedding_anchor: torch.Tensor | None = None,
) -> FitResult:
    """Train with BCE until valid AUC stops improving; leave `model` holding the best weights.

    `scaled` names the parameters trained at `lr_scale` times the LR (see `param_groups`);
    `embedding_anchor` is where the embedding L2 penalty pulls the table (None: zero).
    """
    start = time.perf_counter()
    objective = objective or BCEObjective(model)
    wrapped = _wrap(objective, ctx)
    optimizer = torch.optim.Adam(param_groups(model, cfg.lr, scaled, lr_scale), lr=cfg.lr, weight_decay=cfg.weight_decay)
    fixed = bool(cfg.lr_decay_epochs)
    scheduler: Any
    if fixed:
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=cfg.lr_decay_epochs, gamma=cfg.lr_decay)
    elif cfg.lr_decay >= 1.0:
        scheduler = None  # a constant LR (a weight average can stand in for the decay)
    else:
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max", factor=cfg.lr_decay, patience=cfg.lr_patience, min_lr=cfg.min_lr
        )
    decay = ema_decay_per_step(cfg, steps_per_epoch(len(train), cfg, ctx))
    averaged = WeightAverage(model, decay)
    if decay > 0 and ctx.is_main:
        log.info("weight_average %s", kv(stage=stage, decay=round(decay, 6), horizon_steps=round(1 / (1 - decay), 1)))
    best_auc, best_epoch, best_state, wait = -1.0, -1, copy.deepcopy(model.state_dict()), 0
    best_valid: dict[str, float] = {}
    history: list[dict[str, Any]] = []
    epochs = tqdm(range(cfg.epochs), desc=f"{stage} epochs", disable=not (cfg.progress and ctx.is_main), unit="epoch")
    for epoch in epochs:
        t0 = time.perf_counter()
        out = run_epoch(wrapped, optimizer, train, epoch, cfg, ctx, f"{stage} {epoch + 1}/{cfg.epochs}", model,
                        after_step=averaged.update, embedding_anchor=embedding_anchor)
        valid_m = evaluate_split(averaged.scored, valid, ctx, cfg.eval_batch_size, with_gauc=False)
        lr = max(g["lr"] for g in optimizer.param_groups)
        improved = valid_m["auc"] > best_auc + 1e-6
        if improved:
            best_auc, best_epoch, wait = valid_m["auc"], epoch, 0
            best_state = copy.deepcopy(averaged.scored.state_dict())
            best_valid = valid_m
        else:
            wait += 1
        if fixed:
            scheduler.step()
        elif scheduler is not None:
            scheduler.step(valid_m["auc"])
        # Under a fixed schedule only epochs at the final LR count towards patience.
        counted = min(wait, epoch + 1 - cfg.lr_decay_epochs[-1]) if fixed else wait
        stop = _broadcast_flag(counted >= cfg.patience, ctx)
        row = {"epoch": epoch + 1, "stage": stage, "train_loss": out["loss"], "valid_auc": valid_m["auc"],
               "valid_logloss": valid_m["logloss"], "lr": lr, "seconds": time.perf_counter() - t0}
        if averaged.average is not None:
            # The raw weights' score beside the average's, so one run shows what averaging adds.
            row["valid_auc_raw"] = evaluate_split(model, valid, ctx, cfg.eval_batch_size, with_gauc=False)["auc"]
        # An objective's scalar stats (a joint objective's parts) as per-step means over all ranks.
        row.update({f"train_{k}": float(v) / max(1, out["steps"] * ctx.world) for k, v in out["stats"].items() if v.numel() == 1})
        history.append(row)
        epochs.set_postfix(auc=f"{valid_m['auc']:.5f}", best=f"{best_auc:.5f}")
        if ctx.is_main:
            log.info("epoch_end %s", kv(**{k: v for k, v in row.items()}, best_auc=best_auc))
        if stop:
            if ctx.is_main:
                log.info("early_stop %s", kv(stage=stage, epoch=epoch + 1, best_epoch=best_epoch + 1, best_auc=best_auc))
            break
    epochs.close()
    model.load_state_dict(best_state)
    return FitResult(best_epoch + 1, best_valid, history, time.perf_counter() - start)


def run_fixed_epochs(
    objective: nn.Module,
    params: list[nn.Parameter],
    train: EncodedSplit,
    cfg: TrainConfig,
    ctx: DistContext,
    stage: str,
    on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """A fixed number of epochs with no early stopping (stage 1 pre-training)."""
    wrapped = _wrap(objective, ctx)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = max(1, steps_per_epoch(len(train), cfg, ctx) * cfg.epochs)
    warmup = max(1, total // 20)
    # Linear warm-up then cosine decay: the usual recipe for a Transformer trained from scratch.
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + np.cos(np.pi * min(1.0, s / total)))
    )
    history = []
    epochs = tqdm(range(cfg.epochs), desc=f"{stage} epochs", disable=not (cfg.progress and ctx.is_main), unit="epoch")
    for epoch in epochs:
        t0 = time.perf_counter()
        out = run_epoch(wrapped, optimizer, train, epoch, cfg, ctx, f"{stage} {epoch + 1}/{cfg.epochs}", after_step=scheduler.step)
        out["epoch"] = epoch + 1
        out["seconds"] = time.perf_counter() - t0
        epochs.set_postfix(loss=f"{out['loss']:.4f}")
        if on_epoch_end is not None:
            on_epoch_end(epoch, out)
        history.append(out)
    epochs.close()
    return history
