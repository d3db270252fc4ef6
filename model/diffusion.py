"""Stage 1 of DGenCTR: masked (absorbing-state) discrete diffusion over fields and label.

Forward process: draw t ~ U(0, 1) per sample and replace each element by [MASK] with
probability lambda(t); at least one element is always masked, so every sample teaches
something. The denoiser restores masked fields with a sampled softmax over in-batch
candidates (cosine similarity / tau, duplicates of the true value removed from the
negatives) and a masked label with cross-entropy. Everything is averaged over masked elements.

With `field_weighting: learned` each element kind k (every field, and the label) carries a
learned log-variance s_k and contributes exp(-s_k) * loss + s_k per masked element (Kendall et
al.'s uncertainty weighting, as HeteGenCTR weighs fields by learned difficulty): a field that
cannot be restored from the others (a user id among thousands) stops dominating the sum
against fields that can. The s_k are stage 1's alone (see `LOG_VARIANCE`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from model.dgenctr import DGenCTR
from model.logs import kv
from model.spec import MASK_ID, PAD_ID
from model.transfer import STAGE_ONE_ONLY

log = logging.getLogger(__name__)

# The learned per-field log-variances live on the network under this name, so that a caller that
# optimises `model.parameters()` (the pipeline's stage 1) trains them with everything else.
# `model.transfer` drops every STAGE_ONE_ONLY name, so stage 2 and export never see them.
LOG_VARIANCE = f"{STAGE_ONE_ONLY}field_log_variance"


@dataclass
class PretrainConfig:
    # On Frappe, 2-4 epochs left fine-tuning below the same network from scratch; 10 raised the
    # 3-seed test AUC from 0.9818 to 0.9831, level with scratch (docs/results.md).
    epochs: int = 10
    batch_size: int = 2048
    lr: float = 3e-3  # 1e-3 for one epoch transferred nothing measurable on Frappe (docs/results.md)
    weight_decay: float = 0.01
    schedule: str = "linear"  # lambda(t): "linear" (t) or "cosine" (1 - cos(pi t / 2))
    tau: float = 0.1  # temperature of the cosine sampled softmax
    num_negatives: int = 512  # in-batch candidates per masked field (the first K rows of the batch)
    mask_label: bool = True  # False: the label is never masked (ablation "no label in pre-training")
    label_weight: float = 1.0  # weight of the masked-label cross-entropy against a field's loss
    min_t: float = 0.0  # lower bound of t, to skip nearly-unmasked samples if wanted
    # "learned": a log-variance s_k per field and for the label, loss exp(-s_k) L_k + s_k
    # (module docstring), s_k = 0 at the start. "learned_init": the same, with s_k set on the
    # first batch to the log of that kind's mean masked loss (its optimum for that batch):
    # from 0, Adam at stage 1's LR moves s_k by about lr per step, and on MovieLens-100k (266
    # steps) every s_k ended within 0.27-0.34 of the others, far from log L_k (docs/results.md).
    # "none": every masked element weighs alike (label_weight aside).
    field_weighting: Literal["none", "learned", "learned_init"] = "none"


def mask_prob(t: torch.Tensor, schedule: str = "linear") -> torch.Tensor:
    """lambda(t): the probability that an element is masked at time t in [0, 1]."""
    if schedule == "linear":
        return t
    if schedule == "cosine":
        return 1.0 - torch.cos(t * math.pi / 2)
    raise ValueError(f"unknown mask schedule '{schedule}' (linear or cosine)")


def sample_mask(
    batch: int,
    num_fields: int,
    schedule: str = "linear",
    mask_label: bool = True,
    generator: torch.Generator | None = None,
    min_t: float = 0.0,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Bool mask [batch, num_fields + 1]; the last column is the label.

    Each row has at least one masked element among those allowed (the label is allowed only
    when `mask_label`): a row the coin flips left clean gets one element chosen uniformly.
    """
    n = num_fields + 1
    eligible = n if mask_label else num_fields
    t = min_t + (1.0 - min_t) * torch.rand(batch, 1, generator=generator)
    m = torch.rand(batch, n, generator=generator) < mask_prob(t, schedule)
    if not mask_label:
        m[:, -1] = False
    forced = torch.randint(0, eligible, (batch,), generator=generator)
    empty = ~m.any(dim=1)
    m[empty, forced[empty]] = True
    return m.to(device) if device is not None else m


def sampled_softmax_loss(
    gen: torch.Tensor, cand: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor, tau: float, num_negatives: int,
    per_field: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-element losses for masked feature fields.

    gen [B, F, e]: G_k(h_k); cand [B, F, e]: e(f_k) of each row's true value; tokens [B, F];
    mask [B, F]. The negatives of row b, field k are the first K rows' values of field k,
    minus any equal to row b's true value (which also drops the row itself).

    Returns (loss_sum, correct [F], masked [F]): the summed loss over masked elements (per
    field, [F], with `per_field`) and, per field, how many masked elements ranked the true
    value first.
    """
    g = F.normalize(gen, dim=-1)
    c = F.normalize(cand, dim=-1)
    k = min(num_negatives, tokens.shape[0])
    pos = (g * c).sum(-1) / tau  # [B, F]
    neg = torch.einsum("bfe,kfe->bfk", g, c[:k]) / tau  # [B, F, K]
    dup = tokens.unsqueeze(-1) == tokens[:k].t().unsqueeze(0)  # [B, F, K]
    neg = neg.masked_fill(dup, float("-inf"))
    logits = torch.cat([pos.unsqueeze(-1), neg], dim=-1)
    per_elem = torch.logsumexp(logits, dim=-1) - pos  # [B, F]
    maskf = mask.to(per_elem.dtype)
    loss_sum = (per_elem * maskf).sum(0) if per_field else (per_elem * maskf).sum()
    with torch.no_grad():
        correct = ((pos > neg.max(dim=-1).values) & mask).sum(0).float()
        masked = mask.sum(0).float()
    return loss_sum, correct, masked


def field_reconstruction(
    model: DGenCTR, h: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor, cfg: PretrainConfig, per_field: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The masked fields' sampled-softmax terms: (loss_sum ([F] with `per_field`), correct [F], masked [F], field_mask [B, F])."""
    f = tokens.shape[1]
    # PAD/MASK never appear as real values; OOV does and is a legitimate target.
    field_mask = mask[:, :f] & (tokens != PAD_ID) & (tokens != MASK_ID)
    gen = model.generate(h)
    cand = model.embedding(tokens)
    loss_sum, correct, masked = sampled_softmax_loss(gen, cand, tokens, field_mask, cfg.tau, cfg.num_negatives, per_field)
    return loss_sum, correct, masked, field_mask


class PretrainObjective(nn.Module):
    """Stage-1 loss of a DGenCTR; returns (mean loss over masked elements, stats).

    stats["correct"] and stats["masked"] are [F+1] counts (fields then label), so the loop can
    report each field's in-batch reconstruction accuracy.
    """

    def __init__(self, model: DGenCTR, cfg: PretrainConfig, seed: int) -> None:
        super().__init__()
        if cfg.field_weighting not in ("none", "learned", "learned_init"):
            raise ValueError(f"field_weighting must be 'none', 'learned' or 'learned_init', got '{cfg.field_weighting}'")
        self.model = model
        self.cfg = cfg
        self.generator = torch.Generator().manual_seed(seed)
        self.pending_init = cfg.field_weighting == "learned_init"
        if cfg.field_weighting != "none" and learned_log_variance(model) is None:
            # s_k = 0: every weight starts at 1, the unweighted loss.
            model.register_parameter(LOG_VARIANCE, nn.Parameter(torch.zeros(model.num_fields + 1, device=model.field_id.device)))

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        b, f = tokens.shape
        learned = self.cfg.field_weighting != "none"
        mask = sample_mask(b, f, self.cfg.schedule, self.cfg.mask_label, self.generator, self.cfg.min_t, tokens.device)
        h = self.model.hidden(tokens, labels, mask)
        feat_sum, correct, masked, field_mask = field_reconstruction(self.model, h, tokens, mask, self.cfg, per_field=learned)
        label_mask = mask[:, f]
        logit = self.model.label_logit(h)
        label_ce = F.binary_cross_entropy_with_logits(logit, labels, reduction="none")
        lm = label_mask.to(label_ce.dtype)
        label_sum = (label_ce * lm).sum()
        n_masked = field_mask.sum() + label_mask.sum()
        if learned:
            s = getattr(self.model, LOG_VARIANCE)
            sums = torch.cat([feat_sum, (self.cfg.label_weight * label_sum).view(1)])
            counts = torch.cat([field_mask.sum(0), label_mask.sum().view(1)]).to(sums.dtype)
            if self.pending_init:
                self.pending_init = False
                with torch.no_grad():
                    seen = counts > 0
                    s[seen] = torch.log((sums[seen] / counts[seen]).clamp(min=1e-6))
            loss = (torch.exp(-s) * sums + s * counts).sum() / n_masked.clamp(min=1)
        else:
            loss = (feat_sum + self.cfg.label_weight * label_sum) / n_masked.clamp(min=1)
        with torch.no_grad():
            label_correct = (((logit > 0).to(labels.dtype) == labels) & label_mask).sum().float()
        stats = {
            "correct": torch.cat([correct, label_correct.view(1)]),
            "masked": torch.cat([masked, lm.sum().view(1)]),
        }
        return loss, stats


class FineTuneObjective(nn.Module):
    """DGenCTR's stage 2 with two optional regularisers that keep stage 1's task in view.

    Every stage-2 run overfits within two or three epochs of its LR decay (docs/results.md),
    and stage 1 survives only as a starting point. Both options reuse what stage 1 built:

    - `field_mask_rate` p: in the scoring view, each field is replaced by its learned [MASK]
      embedding with probability p (the label is masked as always). Stage 1 trained the
      network to read the click with fields missing, so this is augmentation the pre-trained
      weights already understand; scoring (p = 0) sees every field, as in export.
    - `aux_weight` W: W times stage 1's masked-field loss on a second, diffusion-masked view of
      the batch's first `aux_rows` rows. The label is never masked there and its head is not
      called, so the label head (and its BatchNorm statistics) sees only the scoring view. On
      Frappe_x1 it narrowed the spread between seeds but did not raise the mean (sixth round).
    """

    def __init__(self, model: DGenCTR, cfg: PretrainConfig, seed: int, field_mask_rate: float = 0.0,
                 aux_weight: float = 0.0, aux_rows: int = 0) -> None:
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.field_mask_rate = field_mask_rate
        self.weight = aux_weight
        self.rows = aux_rows
        self.generator = torch.Generator().manual_seed(seed)

    def _scoring_logit(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.field_mask_rate <= 0:
            return self.model(tokens)
        b, f = tokens.shape
        mask = torch.rand(b, f + 1, generator=self.generator) < self.field_mask_rate
        mask[:, -1] = True
        return self.model.label_logit(self.model.hidden(tokens, None, mask.to(tokens.device)))

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        bce = F.binary_cross_entropy_with_logits(self._scoring_logit(tokens), labels)
        if self.weight <= 0:
            return bce, {}
        aux_tokens, aux_labels = tokens[: self.rows or None], labels[: self.rows or None]
        b, f = aux_tokens.shape
        mask = sample_mask(b, f, self.cfg.schedule, False, self.generator, self.cfg.min_t, tokens.device)
        h = self.model.hidden(aux_tokens, aux_labels, mask)
        feat_sum, _, _, field_mask = field_reconstruction(self.model, h, aux_tokens, mask, self.cfg)
        aux = feat_sum / field_mask.sum().clamp(min=1)
        return bce + self.weight * aux, {"bce": bce.detach(), "aux": aux.detach()}


def learned_log_variance(model: nn.Module) -> torch.Tensor | None:
    """The stage-1 log-variances s_k [F+1] (fields, then the label), or None when not learned."""
    return getattr(model, LOG_VARIANCE, None)


@torch.no_grad()
def reconstruction_report(
    model: DGenCTR, tokens: torch.Tensor, labels: torch.Tensor, field_names: list[str], schedule: str = "linear", seed: int = 0
) -> dict[str, dict[str, float]]:
    """Full-vocabulary top-1 accuracy of each masked field (and the label) on held-out rows.

    Beside each accuracy sits the accuracy of always guessing the field's most frequent value
    in these rows, so a reader sees how much the generator learned beyond the marginal. After a
    stage 1 with learned field weighting, each entry also holds its `log_variance` s_k and
    `weight` exp(-s_k), and the weights are logged (this report is what ends stage 1).
    """
    was = model.training
    model.eval()
    g = torch.Generator().manual_seed(seed)
    b, f = tokens.shape
    mask = sample_mask(b, f, schedule, True, g)
    h = model.hidden(tokens, labels, mask)
    gen = F.normalize(model.generate(h), dim=-1)
    report: dict[str, dict[str, float]] = {}
    for k, name in enumerate(field_names):
        rows = mask[:, k]
        if not rows.any():
            continue
        table = F.normalize(model.embedding.field_table(k), dim=-1).clone()
        scores = gen[rows, k] @ table.t()
        scores[:, PAD_ID] = float("-inf")
        scores[:, MASK_ID] = float("-inf")
        truth = tokens[rows, k]
        acc = (scores.argmax(-1) == truth).float().mean().item()
        mode = torch.mode(tokens[:, k]).values
        report[name] = {"accuracy": acc, "majority": (truth == mode).float().mean().item(), "masked": int(rows.sum())}
    rows = mask[:, -1]
    if rows.any():
        pred = (model.label_logit(h)[rows] > 0).float()
        truth = labels[rows]
        majority = max(truth.mean().item(), 1 - truth.mean().item())
        report["label"] = {"accuracy": (pred == truth).float().mean().item(), "majority": majority, "masked": int(rows.sum())}
    s = learned_log_variance(model)
    if s is not None:
        for name, s_k in zip([*field_names, "label"], s.tolist()):
            if name in report:
                report[name].update(log_variance=s_k, weight=math.exp(-s_k))
            log.info("stage1_field_weight %s", kv(field=name, log_variance=round(s_k, 4), weight=round(math.exp(-s_k), 4)))
    model.train(was)
    return report
