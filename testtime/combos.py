"""Which feature combinations are counted, and their 64-bit keys.

Order 1 is every field. Pairs and triples are limited to a field subset because their number
grows as F^2 and F^3 and each one costs a hash and a counter update per training row. The
defaults (docs/test-time.md): pairs over the `pair_top_k` = 5 and triples over the
`triple_top_k` = 4 non-cross fields with the most values. Cross fields are left out of pairs and
triples: a cross is itself a hashed combination of other fields, so counting it again with its
own inputs adds nothing.

Keys: when a combination's token ids fit in 64 bits next to a combination tag (the common
case: Frappe's user x item pair needs 10 + 12 bits), the key is the exact bit-packing of the ids, so two
different combinations never share a key. Otherwise the ids are mixed with splitmix64, where
a 64-bit collision is negligible next to the sketch's own error.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from model.spec import FeatureSpec

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def _splitmix(x: np.ndarray) -> np.ndarray:
    x = (x ^ (x >> np.uint64(30))) * _MIX1
    x = (x ^ (x >> np.uint64(27))) * _MIX2
    return x ^ (x >> np.uint64(31))


def default_fields(spec: FeatureSpec, order: int, top_k: int | None) -> list[str]:
    """Non-cross fields; for top_k, the k with the largest vocabularies (ties: spec order)."""
    names = [f.name for f in spec.fields if f.kind != "cross"]
    if top_k is None or top_k >= len(names):
        return names
    sizes = {f.name: f.vocab_size for f in spec.fields}
    ranked = sorted(names, key=lambda n: (-sizes[n], names.index(n)))[:top_k]
    return [n for n in names if n in ranked]


@dataclass(frozen=True)
class OrderLayout:
    """The combinations of one order: field index tuples [C, order] and how their keys are made."""

    order: int
    combos: np.ndarray  # [C, order] int64 field indices, ascending within a row
    packed: bool  # exact bit-packing (True) or splitmix hashing (False)
    shifts: np.ndarray  # [C, order] uint64 bit offsets (packed only)
    tags: np.ndarray  # [C] uint64 combination tags

    @property
    def size(self) -> int:
        return int(self.combos.shape[0])

    def keys(self, tokens: np.ndarray) -> np.ndarray:
        """uint64 keys [rows, C] for int64 tokens [rows, F]."""
        return self.keys_t(np.ascontiguousarray(np.asarray(tokens).T)).T

    def keys_t(self, columns: np.ndarray) -> np.ndarray:
        """uint64 keys [C, rows] from field-major tokens [F, rows] (contiguous rows: the fast layout)."""
        t = columns.view(np.uint64) if columns.dtype == np.int64 else columns.astype(np.uint64)
        if self.packed:
            out = t[self.combos[:, 0]] << self.shifts[:, 0, None]
            for k in range(1, self.order):
                out |= t[self.combos[:, k]] << self.shifts[:, k, None]
            out |= self.tags[:, None]
            return out
        with np.errstate(over="ignore"):
            h = np.broadcast_to(self.tags[:, None], (self.size, t.shape[1])).copy()
            for k in range(self.order):
                h = _splitmix(h ^ (t[self.combos[:, k]] + np.uint64(k + 1) * _GOLDEN))
        return h


def make_layout(spec: FeatureSpec, order: int, field_names: Sequence[str]) -> OrderLayout:
    idx = [spec.field_names.index(n) for n in field_names]
    combos = np.array(list(itertools.combinations(sorted(idx), order)), dtype=np.int64).reshape(-1, order)
    bits = np.array([max(1, math.ceil(math.log2(max(v, 2)))) for v in spec.vocab_sizes], dtype=np.int64)
    tag_bits = max(1, math.ceil(math.log2(max(len(combos), 2))))
    need = bits[combos].sum(axis=1) if len(combos) else np.zeros(0, np.int64)
    packed = bool(len(combos) == 0 or need.max() + tag_bits <= 64)
    shifts = np.zeros(combos.shape, dtype=np.uint64)
    if packed:
        for c, row in enumerate(combos):
            off = 0
            for k, f in enumerate(row):
                shifts[c, k] = off
                off += int(bits[f])
        tags = np.arange(len(combos), dtype=np.uint64) << np.uint64(64 - tag_bits)
    else:
        with np.errstate(over="ignore"):
            tags = _splitmix((np.arange(len(combos), dtype=np.uint64) + np.uint64(order) * np.uint64(1 << 32)) ^ _GOLDEN)
    return OrderLayout(order, combos, packed, shifts, tags)
