"""DGenCTR: a bidirectional Transformer denoiser over a sample's fields and its click label.

A sample is the set {f_1 .. f_F, y}. Each element is one token: its value embedding (or the
field's learned [MASK] embedding when it is masked) plus a learned field-id embedding; there
is no positional order. Stage 1 (`model.diffusion`) masks a random subset and trains the
generator heads G_k and the label head to restore it; stage 2 masks only the label and
fine-tunes every weight with BCE. Scoring (`forward`) is stage 2's view: the label is always
[MASK], so the exported graph has no data-dependent control flow.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model.embedding import FieldEmbedding, mlp


@dataclass
class DGenCTRConfig:
    d_model: int = 32
    layers: int = 2
    heads: int = 4
    ffn_mult: int = 4
    dropout: float = 0.0  # 0.1 slowed fine-tuning on Frappe by ~0.02 valid AUC at equal epochs (docs/results.md)
    attn_dropout: float = 0.0
    embedding_dim: int = 0  # 0: same as d_model; otherwise projected to d_model
    # Label head input: "label" reads the label token's state only; "concat" reads every
    # token's state (label + fields), a wider view for the CTR head; "concat_embed" reads
    # "concat" plus the encoder's field inputs (layer-normed value embeddings, [MASK] where
    # masked), so the head holds the DNN's input path and the encoder can only add to it
    # (issue #22 item 5: DGenCTR trailed the DNN on MovieLens-100k).
    readout: str = "concat"
    # 0: a linear label head; n > 0: one GELU hidden layer of width n; a list: a DNN-style
    # Linear-[BN]-ReLU tower of those widths (the baselines' head, so the encoder's features
    # get the same downstream capacity the DNN has).
    head_hidden: int | list[int] = 256
    head_batch_norm: bool = False  # list heads only
    # The head can be regularised apart from the encoder: dropout in the encoder slows
    # fine-tuning (see `dropout`), while the DNN's tower relies on it. None: same as `dropout`.
    head_dropout: float | None = None
    generator: str = "linear"  # G_k: "linear" or "mlp"
    time_embedding: bool = False  # off: the mask pattern already carries t


class SelfAttention(nn.Module):
    def __init__(self, d: int, heads: int, attn_dropout: float) -> None:
        super().__init__()
        if d % heads:
            raise ValueError(f"d_model {d} is not divisible by heads {heads}")
        self.heads = heads
        self.attn_dropout = attn_dropout
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """Pre-norm Transformer encoder block (no causal mask: the denoiser is bidirectional)."""

    def __init__(self, d: int, heads: int, ffn_mult: int, dropout: float, attn_dropout: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = SelfAttention(d, heads, attn_dropout)
        self.ln2 = nn.LayerNorm(d)
        self.ffn = nn.Sequential(nn.Linear(d, ffn_mult * d), nn.GELU(), nn.Linear(ffn_mult * d, d))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.drop(self.ffn(self.ln2(x)))


READOUTS = ("label", "concat", "concat_embed")


class DGenCTR(nn.Module):
    def __init__(self, vocab_sizes: Sequence[int], cfg: DGenCTRConfig) -> None:
        super().__init__()
        if cfg.readout not in READOUTS:
            raise ValueError(f"readout must be one of {', '.join(READOUTS)}, got '{cfg.readout}'")
        if cfg.generator not in ("linear", "mlp"):
            raise ValueError(f"generator must be 'linear' or 'mlp', got '{cfg.generator}'")
        self.cfg = cfg
        n = len(vocab_sizes)
        d = cfg.d_model
        e = cfg.embedding_dim or d
        self.num_fields = n
        self.embedding = FieldEmbedding(vocab_sizes, e, init_std=0.02)
        self.proj = nn.Linear(e, d) if e != d else nn.Identity()
        self.label_embedding = nn.Embedding(2, d)
        self.field_id = nn.Parameter(torch.randn(n + 1, d) * 0.02)
        self.mask_embedding = nn.Parameter(torch.randn(n + 1, d) * 0.02)
        self.time = nn.Linear(1, d) if cfg.time_embedding else None
        self.in_drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(d, cfg.heads, cfg.ffn_mult, cfg.dropout, cfg.attn_dropout) for _ in range(cfg.layers))
        self.ln_f = nn.LayerNorm(d)
        # The value embeddings start at std 0.02 against the states' unit scale (and embedding_l2
        # keeps them small): without a norm the head would barely hear the skip path.
        self.skip_norm = nn.LayerNorm(d) if cfg.readout == "concat_embed" else None
        # Generator heads G_k, one per field, batched as [F, d, e] so all fields run in one einsum.
        if cfg.generator == "mlp":
            self.gen_w1 = nn.Parameter(torch.randn(n, d, d) / math.sqrt(d))
            self.gen_b1 = nn.Parameter(torch.zeros(n, d))
        self.gen_w = nn.Parameter(torch.randn(n, d, e) / math.sqrt(d))
        self.gen_b = nn.Parameter(torch.zeros(n, e))
        head_in = {"label": d, "concat": d * (n + 1), "concat_embed": d * (2 * n + 1)}[cfg.readout]
        head_dropout = cfg.dropout if cfg.head_dropout is None else cfg.head_dropout
        if isinstance(cfg.head_hidden, (list, tuple)):
            self.label_head: nn.Module = mlp([head_in, *cfg.head_hidden], head_dropout, cfg.head_batch_norm, out_dim=1)
        elif cfg.head_hidden > 0:
            self.label_head = nn.Sequential(
                nn.Linear(head_in, cfg.head_hidden), nn.GELU(), nn.Dropout(head_dropout), nn.Linear(cfg.head_hidden, 1)
            )
        else:
            self.label_head = nn.Linear(head_in, 1)

    # ------------------------------------------------------------------ pieces
    def hidden(self, tokens: torch.Tensor, labels: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Denoiser states [B, F+1, d] (fields, then the label).

        `mask` [B, F+1] marks the [MASK]ed elements (stage 1). Without a mask only the label is
        masked (stage 2 and scoring), and `labels` is not needed. With readout "concat_embed"
        the F encoder inputs of the fields follow as rows F+1 .. 2F ([B, 2F+1, d]): the skip
        path then travels with the states, so every caller that hands `encode`'s output to
        `label_logit` (stage 1, the joint stage 2, SGCTR's `Refiner` on re-defined embeddings)
        gets it without knowing about it, and `generate` still reads rows 0 .. F-1.
        """
        return self.encode(self.embedding(tokens), labels, mask)

    def encode(self, values: torch.Tensor, labels: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """`hidden` from field value embeddings [B, F, embedding_dim] instead of tokens.

        SGCTR's refinement (`model.refine`) feeds re-defined embeddings, which are no table
        row, through the same denoiser; `hidden` is this with the table's rows.
        """
        b = values.shape[0]
        x_fields = self.proj(values)
        if mask is None:
            x = torch.cat([x_fields, self.mask_embedding[-1].expand(b, 1, -1)], dim=1)
            masked_frac = torch.full((b, 1), 1.0 / (self.num_fields + 1), dtype=x.dtype, device=x.device)
        else:
            if labels is None:
                labels = torch.zeros(b, dtype=torch.long, device=values.device)
            x = torch.cat([x_fields, self.label_embedding(labels.long()).unsqueeze(1)], dim=1)
            x = torch.where(mask.unsqueeze(-1), self.mask_embedding.unsqueeze(0).expand_as(x), x)
            masked_frac = mask.to(x.dtype).mean(dim=1, keepdim=True)
        skip = x[:, : self.num_fields]  # what the encoder was given: values, or [MASK] where masked
        x = x + self.field_id
        if self.time is not None:
            x = x + self.time(masked_frac).unsqueeze(1)
        x = self.in_drop(x)
        for block in self.blocks:
            x = block(x)
        if self.skip_norm is None:
            return self.ln_f(x)
        return torch.cat([self.ln_f(x), self.skip_norm(skip)], dim=1)

    def label_logit(self, h: torch.Tensor) -> torch.Tensor:
        z = h[:, -1] if self.cfg.readout == "label" else h.flatten(1)
        return self.label_head(z).squeeze(-1)

    def generate(self, h: torch.Tensor) -> torch.Tensor:
        """G_k(h_k) for every field position: [B, F, embedding_dim], compared by cosine with e(f')."""
        z = h[:, : self.num_fields]
        if self.cfg.generator == "mlp":
            z = F.gelu(torch.einsum("bfd,fdk->bfk", z, self.gen_w1) + self.gen_b1)
        return torch.einsum("bfd,fde->bfe", z, self.gen_w) + self.gen_b

    # ------------------------------------------------------------------ scoring
    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Click logits [B]: fields visible, label [MASK], read by the label head."""
        return self.label_logit(self.hidden(tokens))
