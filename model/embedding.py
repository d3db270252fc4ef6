"""The embedding layer every network shares.

All fields live in one table, addressed by `token + offset[field]`. One table means one
Gather in the exported ONNX graph however many fields there are, and a model comparison
in the benchmark differs only in what sits on top of this layer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class FieldEmbedding(nn.Module):
    """tokens int64 [B, F] -> embeddings float [B, F, dim]."""

    def __init__(self, vocab_sizes: Sequence[int], dim: int, init_std: float = 1e-2) -> None:
        super().__init__()
        sizes = [int(v) for v in vocab_sizes]
        if not sizes or min(sizes) < 1:
            raise ValueError(f"vocab_sizes must be positive, got {sizes}")
        self.vocab_sizes = sizes
        self.dim = dim
        offsets = torch.tensor([0] + sizes[:-1], dtype=torch.long).cumsum(0)
        self.register_buffer("offsets", offsets, persistent=False)
        self.table = nn.Embedding(sum(sizes), dim)
        nn.init.normal_(self.table.weight, std=init_std)

    @property
    def num_fields(self) -> int:
        return len(self.vocab_sizes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.table(tokens + self.offsets)

    def field_table(self, k: int) -> torch.Tensor:
        """All embedding rows of field k (reserved ids included), [vocab_k, dim]."""
        start = int(self.offsets[k])
        return self.table.weight[start : start + self.vocab_sizes[k]]


def mlp(sizes: Sequence[int], dropout: float = 0.0, batch_norm: bool = False, out_dim: int | None = None) -> nn.Sequential:
    """Linear-[BN]-ReLU-Dropout blocks, optionally ending in a plain Linear to `out_dim`."""
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers.append(nn.Linear(a, b))
        if batch_norm:
            layers.append(nn.BatchNorm1d(b))
        layers.append(nn.ReLU())
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
    if out_dim is not None:
        layers.append(nn.Linear(sizes[-1], out_dim))
    return nn.Sequential(*layers)
