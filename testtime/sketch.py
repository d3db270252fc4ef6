"""Count-min sketch and heavy-hitter summary over uint64 combination keys, vectorised in numpy.

Why numpy rather than Apache DataSketches: the DataSketches Python bindings update one item per
call, so a row of ~50 combinations costs ~50 Python calls; a numpy sketch hashes and counts a
whole chunk of rows in a handful of array operations. `python -m testtime.bench` measures both
(docs/test-time.md has the figures).

Both summaries are *mergeable*: two count-min tables with the same shape and hash seeds add
up cell by cell, and two heavy-hitter summaries merge into one with the same guarantees
(`lower <= true count <= upper` for every key kept). Counting the same rows in two shards and
merging gives exactly the table of one pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

_U64 = np.uint64


def hash_params(depth: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Multiply-shift parameters (odd multipliers, additive offsets) from a fixed seed."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 2**63, size=depth, dtype=np.uint64) * _U64(2) + _U64(1)
    b = rng.integers(0, 2**63, size=depth, dtype=np.uint64)
    return a, b


@dataclass
class CountMinSketch:
    """`depth` rows of `width` (a power of two) int64 counters.

    Hash row j maps a 64-bit key x to `(a_j * x + b_j) mod 2^64 >> (64 - log2 width)`:
    Dietzfelbinger's multiply-shift, for which two keys collide with probability <= 2/width.
    Hence the estimate (min over rows) never undercounts and overcounts by more than
    `epsilon * total` with probability <= exp(-depth), where epsilon = 2e/width.
    """

    table: np.ndarray  # [depth, width] int64
    a: np.ndarray  # [depth] uint64, odd
    b: np.ndarray  # [depth] uint64

    @classmethod
    def empty(cls, depth: int, width: int, seed: int) -> "CountMinSketch":
        if width < 2 or width & (width - 1):
            raise ValueError(f"count-min width must be a power of two >= 2, got {width}")
        if depth < 1:
            raise ValueError(f"count-min depth must be >= 1, got {depth}")
        a, b = hash_params(depth, seed)
        return cls(np.zeros((depth, width), dtype=np.int64), a, b)

    @property
    def depth(self) -> int:
        return int(self.table.shape[0])

    @property
    def width(self) -> int:
        return int(self.table.shape[1])

    @property
    def total(self) -> int:
        """Items counted (every row sums to it)."""
        return int(self.table[0].sum())

    @property
    def epsilon(self) -> float:
        return 2.0 * math.e / self.width

    @property
    def delta(self) -> float:
        """Probability that one estimate exceeds the truth by more than epsilon * total."""
        return math.exp(-self.depth)

    def cells(self, keys: np.ndarray) -> np.ndarray:
        """Column of each key in each hash row: [depth, n] (uint64, all < width)."""
        keys = np.ascontiguousarray(keys, dtype=np.uint64).reshape(-1)
        shift = _U64(64 - int(math.log2(self.width)))
        out = np.empty((self.depth, keys.size), dtype=np.uint64)
        with np.errstate(over="ignore"):
            for j in range(self.depth):
                np.multiply(keys, self.a[j], out=out[j])
                out[j] += self.b[j]
                out[j] >>= shift
        return out.view(np.int64)

    def add_cells(self, cells: np.ndarray) -> None:
        for j in range(self.depth):
            self.table[j] += np.bincount(cells[j], minlength=self.width)

    def update(self, keys: np.ndarray) -> None:
        self.add_cells(self.cells(keys))

    def estimate_cells(self, cells: np.ndarray, table: np.ndarray | None = None) -> np.ndarray:
        t = self.table if table is None else table
        est = t[0][cells[0]]
        for j in range(1, self.depth):
            np.minimum(est, t[j][cells[j]], out=est)
        return est

    def first_row(self, keys: np.ndarray) -> np.ndarray:
        """Hash row 0's counter for each key: an upper bound too, a quarter of `estimate`'s cost."""
        keys = np.ascontiguousarray(keys, dtype=np.uint64).reshape(-1)
        with np.errstate(over="ignore"):
            cells = (keys * self.a[0] + self.b[0]) >> _U64(64 - int(math.log2(self.width)))
        return self.table[0][cells.view(np.int64)]

    def estimate(self, keys: np.ndarray) -> np.ndarray:
        """Upper-bound counts (int64) of `keys`, same shape as `keys`."""
        keys = np.asarray(keys)
        return self.estimate_cells(self.cells(keys)).reshape(keys.shape)

    def merge(self, other: "CountMinSketch") -> "CountMinSketch":
        if self.table.shape != other.table.shape or not (np.array_equal(self.a, other.a) and np.array_equal(self.b, other.b)):
            raise ValueError("count-min sketches merge only with the same depth, width and hash seed")
        return CountMinSketch(self.table + other.table, self.a.copy(), self.b.copy())


@dataclass
class HeavyHitters:
    """The top-`capacity` keys by count, each with `lower <= true count <= upper`.

    Fed one chunk at a time (`offer`) with the chunk's exact counts of the keys that may be
    heavy and their count-min estimates. `lower` is the exact count since the key was tracked
    (occurrences before, or in chunks where it was filtered out, are missing, so it can only
    undercount); `upper` is the count-min estimate, which never undercounts, refreshed by
    `finalize`. When more than `capacity` keys are tracked the smallest estimates are dropped,
    and `floor` keeps the largest count ever dropped or filtered out: while it is 0 nothing was
    lost, every count is exact and `finalize` sets `upper = lower`.
    """

    capacity: int
    keys: np.ndarray  # uint64, sorted
    lower: np.ndarray  # int64
    upper: np.ndarray  # int64
    floor: int = 0

    @classmethod
    def empty(cls, capacity: int) -> "HeavyHitters":
        return cls(int(capacity), np.empty(0, np.uint64), np.empty(0, np.int64), np.empty(0, np.int64), 0)

    @property
    def exact(self) -> bool:
        return self.floor == 0

    @property
    def full(self) -> bool:
        return self.keys.size >= self.capacity

    @property
    def threshold(self) -> int:
        """Keys whose estimate is below this cannot enter a full summary."""
        return int(self.upper.min()) if self.full and self.upper.size else 0

    def note_dropped(self, bound: int) -> None:
        """Keys not offered (below the threshold) had at most `bound` occurrences so far."""
        self.floor = max(self.floor, int(bound))

    def offer(self, keys: np.ndarray, counts: np.ndarray, estimate: Callable[[np.ndarray], np.ndarray]) -> None:
        """`keys` unique; `counts` their exact counts in the chunk; `estimate(keys)` their
        count-min estimates, asked only for keys not tracked yet. A tracked key's ranking bound
        grows by its chunk count (its true bound comes from the sketch in `finalize`)."""
        if keys.size == 0:
            return
        found, pos = self._find(keys)
        if found.any():
            self.lower[pos[found]] += counts[found]
            self.upper[pos[found]] += counts[found]
        new = ~found
        if new.any():
            fresh = keys[new]
            self._set(np.concatenate([self.keys, fresh]), np.concatenate([self.lower, counts[new]]),
                      np.concatenate([self.upper, np.maximum(estimate(fresh), counts[new])]))

    def _find(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.keys.size == 0:
            return np.zeros(keys.size, bool), np.zeros(keys.size, np.intp)
        pos = np.minimum(np.searchsorted(self.keys, keys), self.keys.size - 1)
        return self.keys[pos] == keys, pos

    def _set(self, keys: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> None:
        if keys.size > self.capacity:
            # Keep the largest estimates. Ties at the cut are broken by key, so the kept set
            # does not depend on the order keys arrived in.
            cut = np.partition(upper, keys.size - self.capacity)[keys.size - self.capacity]
            above, at = upper > cut, upper == cut
            need = self.capacity - int(above.sum())
            tied = np.flatnonzero(at)
            tied = tied[np.argsort(keys[tied], kind="stable")]
            kept = np.concatenate([np.flatnonzero(above), tied[:need]])
            dropped = np.ones(keys.size, bool)
            dropped[kept] = False
            self.floor = max(self.floor, int(upper[dropped].max()))
            keys, lower, upper = keys[kept], lower[kept], upper[kept]
        order = np.argsort(keys, kind="stable")
        self.keys, self.lower, self.upper = keys[order], lower[order], upper[order]

    def finalize(self, sketch: CountMinSketch) -> None:
        """Upper bounds from the (final, possibly merged) sketch; exact counts when nothing was lost."""
        self.upper = self.lower.copy() if self.exact else np.maximum(sketch.estimate(self.keys), self.lower)

    def merge(self, other: "HeavyHitters", sketch: CountMinSketch) -> "HeavyHitters":
        """Union of two shards' summaries, finalized against the merged `sketch`. Lower bounds
        add (a key missing in one shard contributes 0 there); whatever either shard lost
        makes the result inexact."""
        keys = np.union1d(self.keys, other.keys)
        lower = np.zeros(keys.size, np.int64)
        for s in (self, other):
            found, pos = s._find(keys)
            lower[found] += s.lower[pos[found]]
        out = HeavyHitters(max(self.capacity, other.capacity), np.empty(0, np.uint64), np.empty(0, np.int64),
                           np.empty(0, np.int64), self.floor + other.floor)
        out._set(keys, lower, sketch.estimate(keys) if keys.size else np.empty(0, np.int64))
        out.finalize(sketch)
        return out

    def lookup(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(found mask, lower, upper) for `keys` (any shape); bounds are 0 where not found."""
        shape = np.shape(keys)
        flat = np.asarray(keys, dtype=np.uint64).reshape(-1)
        found, pos = self._find(flat)
        lower = np.where(found, self.lower[pos], 0) if self.keys.size else np.zeros(flat.size, np.int64)
        upper = np.where(found, self.upper[pos], 0) if self.keys.size else np.zeros(flat.size, np.int64)
        return found.reshape(shape), lower.reshape(shape), upper.reshape(shape)


def chunk_counts(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact counts of the keys in one chunk (sorted unique keys, counts)."""
    return np.unique(np.asarray(keys, dtype=np.uint64).reshape(-1), return_counts=True)
