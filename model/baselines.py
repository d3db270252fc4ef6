"""Baselines in the same harness as DGenCTR: DNN, DeepFM and DCNv2.

Each takes int64 tokens [B, F] and returns click logits [B]; the shared `FieldEmbedding`
and the shared trainer mean that a comparison in the benchmark is only about the model.
Defaults follow the BARS/FuxiCTR Frappe settings (embedding 10, MLP 400-400-400).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from model.embedding import FieldEmbedding, mlp


@dataclass
class DNNConfig:
    embedding_dim: int = 10
    hidden: list[int] = field(default_factory=lambda: [400, 400, 400])
    dropout: float = 0.2
    batch_norm: bool = True


@dataclass
class DeepFMConfig(DNNConfig):
    pass


@dataclass
class DCNv2Config(DNNConfig):
    cross_layers: int = 3
    # "parallel": cross and deep towers side by side; "stacked": deep on top of cross.
    structure: str = "parallel"
    low_rank: int = 0  # 0 = full-rank cross matrices; >0 = the paper's low-rank (mixture-free) variant


class DNN(nn.Module):
    def __init__(self, vocab_sizes: Sequence[int], cfg: DNNConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embedding = FieldEmbedding(vocab_sizes, cfg.embedding_dim)
        width = len(vocab_sizes) * cfg.embedding_dim
        self.tower = mlp([width, *cfg.hidden], cfg.dropout, cfg.batch_norm, out_dim=1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embedding(tokens).flatten(1)
        return self.tower(x).squeeze(-1)


class DeepFM(nn.Module):
    """First-order weights + FM pairwise term + DNN, all on one shared embedding."""

    def __init__(self, vocab_sizes: Sequence[int], cfg: DeepFMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embedding = FieldEmbedding(vocab_sizes, cfg.embedding_dim)
        self.linear = FieldEmbedding(vocab_sizes, 1)
        self.bias = nn.Parameter(torch.zeros(1))
        width = len(vocab_sizes) * cfg.embedding_dim
        self.tower = mlp([width, *cfg.hidden], cfg.dropout, cfg.batch_norm, out_dim=1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        e = self.embedding(tokens)  # [B, F, D]
        first = self.linear(tokens).sum(dim=(1, 2))
        square_of_sum = e.sum(1).pow(2)
        sum_of_square = e.pow(2).sum(1)
        fm = 0.5 * (square_of_sum - sum_of_square).sum(-1)
        deep = self.tower(e.flatten(1)).squeeze(-1)
        return first + fm + deep + self.bias


class CrossLayer(nn.Module):
    """x_{l+1} = x_0 * (W x_l + b) + x_l (DCN-V2), full or low rank."""

    def __init__(self, width: int, low_rank: int = 0) -> None:
        super().__init__()
        if low_rank > 0:
            self.proj: nn.Module = nn.Sequential(nn.Linear(width, low_rank, bias=False), nn.Linear(low_rank, width))
        else:
            self.proj = nn.Linear(width, width)

    def forward(self, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x0 * self.proj(x) + x


class DCNv2(nn.Module):
    def __init__(self, vocab_sizes: Sequence[int], cfg: DCNv2Config) -> None:
        super().__init__()
        if cfg.structure not in ("parallel", "stacked"):
            raise ValueError(f"DCNv2 structure must be 'parallel' or 'stacked', got '{cfg.structure}'")
        self.cfg = cfg
        self.embedding = FieldEmbedding(vocab_sizes, cfg.embedding_dim)
        width = len(vocab_sizes) * cfg.embedding_dim
        self.cross = nn.ModuleList(CrossLayer(width, cfg.low_rank) for _ in range(cfg.cross_layers))
        self.deep = mlp([width, *cfg.hidden], cfg.dropout, cfg.batch_norm)
        deep_out = cfg.hidden[-1] if cfg.hidden else width
        head_in = width + deep_out if cfg.structure == "parallel" else deep_out
        self.head = nn.Linear(head_in, 1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x0 = self.embedding(tokens).flatten(1)
        x = x0
        for layer in self.cross:
            x = layer(x0, x)
        if self.cfg.structure == "parallel":
            z = torch.cat([x, self.deep(x0)], dim=-1)
        else:
            z = self.deep(x)
        return self.head(z).squeeze(-1)
