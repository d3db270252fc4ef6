"""Splits encoded once into int64 tensors, iterated with seeded permutations.

Frappe's train split is 202k rows x 10 fields (16 MB as int64), so the whole thing lives in
memory and an epoch is a permutation plus slicing: no DataLoader workers to compete with the
two training threads. For Parquet larger than memory, `stream_batches` walks the file with
`model.readers.iter_parquet_batches` and encodes each chunk with the same spec.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from model.logs import kv
from model.readers import DataError, iter_parquet_batches, read_table, split_path
from model.spec import FeatureSpec, SpecError

log = logging.getLogger(__name__)


@dataclass
class EncodedSplit:
    """tokens [N, F] int64, labels [N] float32, groups [N] (raw group ids, for GAUC) or None."""

    tokens: torch.Tensor
    labels: torch.Tensor
    groups: np.ndarray | None

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def head(self, n: int) -> "EncodedSplit":
        return EncodedSplit(self.tokens[:n], self.labels[:n], None if self.groups is None else self.groups[:n])


def encode_table(spec: FeatureSpec, table, where: str) -> EncodedSplit:
    if spec.label not in table.columns:
        raise SpecError(f"label column '{spec.label}' is not in {where} (columns: {', '.join(map(str, table.columns))})")
    labels = table[spec.label].to_numpy()
    if not np.isin(labels, (0, 1)).all():
        raise SpecError(f"label column '{spec.label}' in {where} must hold only 0/1")
    tokens = torch.from_numpy(np.ascontiguousarray(spec.encode(table), dtype=np.int64))
    groups = None
    if spec.group and spec.group in table.columns:
        groups = table[spec.group].astype(str).to_numpy()
    return EncodedSplit(tokens, torch.from_numpy(labels.astype(np.float32)), groups)


def load_encoded(
    spec: FeatureSpec, data_dir: str | Path, splits: tuple[str, ...] = ("train", "valid", "test"), max_rows: int | None = None
) -> tuple[FeatureSpec, dict[str, EncodedSplit]]:
    """Fit the spec on train only (unless already fitted), then encode every split."""
    d = Path(data_dir)
    if not d.is_dir():
        raise DataError(f"data directory not found: {d}")
    tables = {}
    for s in splits:
        p = split_path(d, s)
        t = read_table(p)
        if max_rows:
            t = t.iloc[:max_rows]
        tables[s] = (p, t)
    if not spec.fitted:
        train_path, train = tables["train"]
        if spec.label not in train.columns:
            raise SpecError(f"label column '{spec.label}' is not in {train_path}")
        spec = spec.fit(train)
    out = {s: encode_table(spec, t, str(p)) for s, (p, t) in tables.items()}
    log.info("data_encoded %s", kv(data=str(d), **{f"{s}_rows": len(e) for s, e in out.items()}, fields=spec.num_fields))
    return spec, out


def stream_batches(spec: FeatureSpec, path: str | Path, batch_rows: int) -> Iterator[EncodedSplit]:
    """Encode a Parquet file chunk by chunk, for training data that does not fit in memory."""
    for chunk in iter_parquet_batches(path, batch_rows):
        yield encode_table(spec, chunk, str(path))


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world: int = 1, drop_last: bool = False) -> list[torch.Tensor]:
    """Index batches for one epoch: one seeded permutation, sharded across ranks.

    Every rank draws the same permutation (seed, epoch), keeps every world-th index and
    trims to a common length, so all ranks run the same number of steps (DDP needs that)
    and the union of shards is the permutation.
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g)
    per_rank = n // world
    shard = perm[rank::world][:per_rank]
    local = max(1, batch_size // world)
    batches = list(torch.split(shard, local))
    if drop_last and len(batches) > 1 and len(batches[-1]) < local:
        batches.pop()
    return batches
