"""The noise stress tool: the same split with a share of its fields replaced at random.

SGCTR claims to help most when observed features are wrong, so its evaluation scores a
split as it is and again with a share of the (row, field) cells replaced (5%, 10%, 20% in
docs/sgctr.md). Every cell is chosen independently with probability `share`; a chosen cell
takes the value the same field has in another row of the split drawn uniformly
(`mode="marginal"`: replaced values are as frequent as real ones, so a rare-value detector
cannot spot them) or a value drawn uniformly from the field's vocabulary
(`mode="uniform"`). The labels are untouched: the clicks still follow the clean values.

Works on encoded tokens, so the same corruption feeds `ctr evaluate --noise` (onnxruntime)
and any torch evaluation alike; seeded, so a figure can be reproduced exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from model.spec import MASK_ID, NUM_RESERVED, PAD_ID

NoiseMode = Literal["marginal", "uniform"]


@dataclass(frozen=True)
class NoiseReport:
    share: float  # asked
    chosen: float  # share of cells chosen for replacement
    changed: float  # share of cells whose token really changed (a draw can repeat the value)
    seed: int
    mode: str

    def as_dict(self) -> dict[str, float | int | str]:
        return {"share": self.share, "chosen": self.chosen, "changed": self.changed, "seed": self.seed, "mode": self.mode}


def corrupt_tokens(
    tokens: np.ndarray,
    share: float,
    seed: int = 0,
    *,
    vocab_sizes: list[int] | None = None,
    mode: NoiseMode = "marginal",
    fields: list[int] | None = None,
) -> tuple[np.ndarray, np.ndarray, NoiseReport]:
    """(corrupted copy [N, F], chosen mask [N, F], report). `fields`: only these columns.

    PAD and MASK cells are never chosen: they are not observed values.
    """
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"noise share must be in [0, 1], got {share}")
    tokens = np.asarray(tokens, dtype=np.int64)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [rows, fields], got shape {tokens.shape}")
    n, f = tokens.shape
    rng = np.random.default_rng(seed)
    chosen = rng.random((n, f)) < share
    chosen &= (tokens != PAD_ID) & (tokens != MASK_ID)
    if fields is not None:
        allowed = np.zeros(f, dtype=bool)
        allowed[list(fields)] = True
        chosen &= allowed[None, :]
    out = tokens.copy()
    if mode == "marginal":
        if n:
            donors = rng.integers(0, n, size=(n, f))
            out[chosen] = tokens[donors, np.arange(f)[None, :]][chosen]
    elif mode == "uniform":
        if vocab_sizes is None or len(vocab_sizes) != f:
            raise ValueError("mode='uniform' needs the spec's vocab_sizes, one per field")
        high = np.maximum(np.asarray(vocab_sizes, dtype=np.int64), NUM_RESERVED + 1)
        draws = rng.integers(NUM_RESERVED, high[None, :], size=(n, f))
        out[chosen] = draws[chosen]
    else:
        raise ValueError(f"unknown noise mode '{mode}' (marginal or uniform)")
    cells = max(n * f, 1)
    report = NoiseReport(float(share), float(chosen.sum() / cells), float((out != tokens).sum() / cells), int(seed), mode)
    return out, chosen, report
