"""SGCTR's inference: re-define a sample's noisy fields with DGenCTR's own generator, then score.

The reconstruction of the research note (docs/sgctr.md), vectorised over the batch and with
no data-dependent control flow, so one exported graph per R runs it:

    v = e(tokens)                                    # observed value embeddings [B, F, e]
    for r in 1..R:
        masked denoiser runs -> g_k = G_k(h_k) for the fields scored this pass (each masked)
        s_k = cos(v_k, g_k)                          # self-consistency of the current value
        select K_r: the `ratio` least consistent fields per row (or random ones)
        p_k = softmax over the field's vocabulary of cos(g_k, e(.)) / tau
        w_k = p_k[observed value]                    # the generator's belief in what was seen
        v_k <- w_k v_k + (1 - w_k) ĝ_k  for k in K_r  # ĝ_k = sum_v p_k(v) e(v), the posterior mean
    click = label head on the denoiser with every field visible (re-defined) and the label [MASK]

With R = 0 this is exactly `DGenCTR.forward`. Which runs score a field (the `score` setting)
is the cost choice: `sweep` masks every field once per pass (`groups` runs, fields split by
index mod groups), `rotate` masks one group per pass (one run). The G_k heads and the [MASK]
embeddings are the ones the fine-tuned network carries (stage 2 keeps every stage-1 tensor;
`--aux-weight` keeps training the heads, see docs/sgctr.md for whether it matters).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from model.calibration import Calibrated
from model.dgenctr import DGenCTR
from model.spec import MASK_ID, PAD_ID
from testtime.sgctr import SgctrConfig

# Counter-hash constants for random selection (integer arithmetic: bit-exact in torch and ONNX).
_HASH_MOD = 1 << 24
_ROW_MULT = 40503
_FIELD_MULT = 9973
_PASS_MULT = 7919


def unwrap(model: nn.Module) -> tuple[DGenCTR, float, float]:
    """The DGenCTR inside a loaded run and its post-hoc calibration (scale, bias)."""
    if isinstance(model, Calibrated):
        inner = model.model
        scale, bias = float(model.scale), float(model.bias)
    else:
        inner, scale, bias = model, 1.0, 0.0
    if not isinstance(inner, DGenCTR):
        raise TypeError(f"SGCTR needs a DGenCTR (it re-uses the generator heads G_k), got {type(inner).__name__}")
    return inner, scale, bias


class Refiner(nn.Module):
    """tokens int64 [B, F] -> calibrated click logit [B] after `config.passes` refinement passes."""

    def __init__(self, model: nn.Module, config: SgctrConfig, field_names: list[str] | None = None) -> None:
        super().__init__()
        net, scale, bias = unwrap(model)
        self.net = net
        self.config = config
        self.scale, self.bias = scale, bias
        n = net.num_fields
        self.groups = min(config.groups, n)
        allowed = [True] * n
        if config.fields is not None:
            names = field_names or []
            unknown = [f for f in config.fields if f not in names]
            if unknown:
                raise ValueError(f"sgctr fields {unknown} are not in the spec ({', '.join(names)})")
            allowed = [name in config.fields for name in names]
        # Python-side copies: how many fields a pass may select is a constant of the graph.
        self._allowed = allowed
        self._group_of = [k % self.groups for k in range(n)]
        self.register_buffer("allowed", torch.tensor(allowed, dtype=torch.bool), persistent=False)
        self.register_buffer("group_of", torch.tensor(self._group_of, dtype=torch.long), persistent=False)
        # Stage 1 never trained G_k on PAD or MASK targets: they get no probability mass.
        sizes = net.embedding.vocab_sizes
        self._slices = [(int(net.embedding.offsets[k]), sizes[k]) for k in range(n)]
        reserved = torch.zeros(max(sizes))
        reserved[PAD_ID] = float("-inf")
        if max(sizes) > MASK_ID:
            reserved[MASK_ID] = float("-inf")
        self.register_buffer("reserved", reserved, persistent=False)
        self.register_buffer("field_mult", torch.arange(1, n + 1, dtype=torch.long) * _FIELD_MULT, persistent=False)

    # ------------------------------------------------------------------ one pass
    def _masked_runs(self, v: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(g [B, F, e], scored [F] bool): G_k of each field scored this pass, from the run that masked it."""
        net = self.net
        b, n = v.shape[0], net.num_fields
        groups = range(self.groups) if self.config.score == "sweep" else [r % self.groups]
        g = torch.zeros_like(v)
        scored = torch.zeros(n, dtype=torch.bool, device=v.device)
        for grp in groups:
            fields = self.group_of == grp
            mask = torch.cat([fields, torch.ones(1, dtype=torch.bool, device=v.device)]).unsqueeze(0).expand(b, n + 1)
            gen = net.generate(net.encode(v, None, mask))
            g = torch.where(fields.view(1, n, 1), gen, g)
            scored = scored | fields
        return g, scored

    def _scored(self, r: int, k: int) -> bool:
        return self.config.score == "sweep" or self._group_of[k] == r % self.groups

    def _vocab_probs(self, g: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(p_obs [B, F], mean [B, F, e]) over each field's full vocabulary; with weight=relative,
        p_obs is divided by the most probable value's p (1 when the observed value is the mode)."""
        table = self.net.embedding.table.weight
        gn = F.normalize(g, dim=-1)
        p_obs, means = [], []
        for k, (start, size) in enumerate(self._slices):
            rows = table[start : start + size]
            logits = gn[:, k] @ F.normalize(rows, dim=-1).t() / self.config.tau + self.reserved[:size]
            p = torch.softmax(logits, dim=-1)
            obs_p = p.gather(1, tokens[:, k : k + 1]).squeeze(1)
            p_obs.append(obs_p / p.amax(dim=-1) if self.config.weight == "relative" else obs_p)
            means.append(p @ rows)
        return torch.stack(p_obs, dim=1), torch.stack(means, dim=1)

    def _batch_probs(self, g: torch.Tensor, obs: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(p_obs, mean) over the batch's values of each field, duplicates of a row's value counted once."""
        gn, cn = F.normalize(g, dim=-1), F.normalize(obs, dim=-1)
        logits = torch.einsum("bfe,cfe->fbc", gn, cn) / self.config.tau  # [F, B, B]
        tt = tokens.t()
        same = tt.unsqueeze(2) == tt.unsqueeze(1)  # [F, B, B]: row c holds row b's value
        eye = torch.eye(tokens.shape[0], dtype=torch.bool, device=tokens.device).unsqueeze(0)
        reserved = (tt == PAD_ID) | (tt == MASK_ID)
        drop = (same & ~eye) | reserved.unsqueeze(1)
        p = torch.softmax(logits.masked_fill(drop, float("-inf")), dim=-1)
        p_obs = torch.diagonal(p, dim1=1, dim2=2).t()  # [B, F]
        mean = torch.einsum("fbc,cfe->bfe", p, obs)
        return torch.nan_to_num(p_obs), torch.nan_to_num(mean)

    def _priority(self, s: torch.Tensor, tokens: torch.Tensor, r: int) -> torch.Tensor:
        """Lower = re-defined first."""
        if self.config.selection == "targeted":
            return s
        if self.config.selection == "all":
            return torch.zeros_like(s)
        row = (tokens % _HASH_MOD * self.field_mult).sum(dim=1, keepdim=True) % _HASH_MOD
        h = (row * _ROW_MULT + self.field_mult + (r + 1) * _PASS_MULT) % _HASH_MOD
        return h.to(s.dtype)

    def refine_values(self, tokens: torch.Tensor) -> torch.Tensor:
        """The re-defined value embeddings [B, F, e] after `passes` passes."""
        cfg = self.config
        obs = self.net.embedding(tokens)
        v = obs
        eligible = (tokens != PAD_ID) & (tokens != MASK_ID) & self.allowed
        for r in range(cfg.passes):
            g, scored = self._masked_runs(v, r)
            candidates = scored & self.allowed
            count = sum(a and self._scored(r, k) for k, a in enumerate(self._allowed))
            if count == 0:
                continue
            k_sel = max(1, math.ceil(cfg.ratio * count - 1e-9))
            s = F.cosine_similarity(v, g, dim=-1)
            priority = self._priority(s, tokens, r).masked_fill(~candidates, float("inf"))
            kth = torch.topk(priority, k_sel, dim=1, largest=False).values[:, -1:]
            select = (priority <= kth) & candidates & eligible
            if cfg.weight == "zero" and cfg.generated == "direction":  # no candidate softmax needed
                p_obs, mean = torch.zeros_like(s), g
            elif cfg.weight == "batch":
                p_obs, mean = self._batch_probs(g, obs, tokens)
            else:
                p_obs, mean = self._vocab_probs(g, tokens)
            w = torch.zeros_like(p_obs) if cfg.weight == "zero" else p_obs
            gen = mean if cfg.generated == "mean" else F.normalize(g, dim=-1) * v.norm(dim=-1, keepdim=True)
            blended = w.unsqueeze(-1) * v + (1 - w.unsqueeze(-1)) * gen
            v = torch.where(select.unsqueeze(-1), blended, v)
        return v

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        net = self.net
        logit = net.label_logit(net.encode(self.refine_values(tokens)))
        return logit.float() * self.scale + self.bias


@torch.no_grad()
def generator_report(model: nn.Module, tokens: torch.Tensor, field_names: list[str], seed: int = 0) -> dict[str, float]:
    """How well the shipped G_k heads still read their field with it masked: mean full-vocabulary
    top-1 accuracy and the mean probability of the true value, each field masked alone.

    A fine-tuned network without the auxiliary loss carries stage 1's heads on a body that
    moved; this is the number that says whether they still fit it (docs/sgctr.md).
    """
    net, _, _ = unwrap(model)
    net.eval()
    cfg = SgctrConfig(groups=net.num_fields, score="sweep", passes=1)
    ref = Refiner(net, cfg, field_names).eval()
    v = net.embedding(tokens)
    g, _ = ref._masked_runs(v, 0)
    p_obs, _ = ref._vocab_probs(g, tokens)
    table = net.embedding.table.weight
    gn = F.normalize(g, dim=-1)
    acc = []
    for k, (start, size) in enumerate(ref._slices):
        logits = gn[:, k] @ F.normalize(table[start : start + size], dim=-1).t() + ref.reserved[:size]
        acc.append((logits.argmax(-1) == tokens[:, k]).float())
    accuracy = torch.stack(acc, dim=1)
    out = {"rows": int(tokens.shape[0]), "top1": float(accuracy.mean()), "p_true": float(p_obs.mean())}
    out["per_field_top1"] = {n: float(a) for n, a in zip(field_names, accuracy.mean(0))}  # type: ignore[assignment]
    return out
