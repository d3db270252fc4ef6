"""Frequency bounds of a batch's combinations, and per-field confidence, vectorised over rows.

Why lower bounds: a rare combination is what MATT distrusts, and the count-min estimate of a
rare key is mostly other keys' collisions. The light-tail bound is the estimate from a
*residual* sketch (the heavy hitters' counted occurrences taken out) minus the sketch's error
bound epsilon * N_light, clipped at 0: with probability >= 1 - exp(-depth) it does not exceed
the true count. Heavy hitters use their tracked counts (exact when nothing was dropped).
Hierarchy: a combination cannot be more frequent than any of its sub-combinations, so both
bounds are capped by the sub-combinations' bounds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from testtime.stats import ComboStats


@dataclass
class OrderBounds:
    lower: np.ndarray  # [B, C] int64
    upper: np.ndarray  # [B, C] int64


class ComboIndex:
    """Read-only lookup structures for one ComboStats (built once per loaded package)."""

    def __init__(self, stats: ComboStats) -> None:
        self.stats = stats
        self.offsets = stats.offsets
        self.num_fields = len(stats.spec_fields)
        self.layouts = stats.layouts
        self.orders = sorted(stats.layouts)
        self.residual: dict[int, np.ndarray] = {}
        self.light_error: dict[int, float] = {}
        for o, cms in stats.sketches.items():
            hh = stats.heavy[o]
            table = cms.table.copy()
            if hh.keys.size:
                cells = cms.cells(hh.keys)
                for j in range(cms.depth):
                    table[j] -= np.bincount(cells[j], weights=hh.lower, minlength=cms.width).astype(np.int64)
            self.residual[o] = table
            light_total = max(cms.total - int(hh.lower.sum()), 0)
            self.light_error[o] = cms.epsilon * light_total
        # Heavy-hitter positions by hash table: ~20x faster than a binary search per key at
        # serving batch sizes (pandas' C table, as model/spec.py uses for strings).
        self.heavy_lookup = {o: _PositionLookup(h.keys) for o, h in stats.heavy.items()}
        # For each combination of order o, the columns of its sub-combinations of order o-1.
        self.sub_columns: dict[int, np.ndarray] = {}
        for o in self.orders:
            if o == 1:
                continue
            lower_layout = self.layouts.get(o - 1)
            position = {tuple(c): i for i, c in enumerate(lower_layout.combos.tolist())} if lower_layout is not None else {}
            subs = []
            for combo in self.layouts[o].combos.tolist():
                parts = [tuple(x for x in combo if x != drop) for drop in combo]
                subs.append([position.get(p, -1) for p in parts])
            self.sub_columns[o] = np.array(subs, dtype=np.int64)
        # Membership [C_o, F]: which fields each combination contains.
        self.members: dict[int, np.ndarray] = {}
        for o in self.orders:
            m = np.zeros((self.layouts[o].size, self.num_fields), dtype=bool)
            for c, combo in enumerate(self.layouts[o].combos):
                m[c, combo] = True
            self.members[o] = m

    def bounds(self, tokens: np.ndarray, orders: list[int] | None = None, need_upper: bool = True,
               heavy_hitters: bool = True) -> dict[int, OrderBounds]:
        """Lower and upper bounds per order. `need_upper=False` skips the full-sketch estimate
        of the light tail (its upper bound is then the residual estimate, still >= the count).
        `heavy_hitters=False` reads the count-min sketch alone, as if no summary had been kept
        (the "heap off" ablation): upper = the plain estimate, lower = it minus epsilon * N."""
        tokens = np.asarray(tokens, dtype=np.int64)
        out: dict[int, OrderBounds] = {}
        singles = self.stats.singles[tokens + self.offsets]
        out[1] = OrderBounds(singles, singles)
        columns = np.ascontiguousarray(tokens.T)
        for o in sorted(orders or self.orders):
            if o == 1 or o not in self.layouts:
                continue
            keys = self.layouts[o].keys_t(columns)  # [C, B]
            cms, hh = self.stats.sketches[o], self.stats.heavy[o]
            cells = cms.cells(keys)
            if not heavy_hitters:
                upper = cms.estimate_cells(cells).reshape(keys.shape)
                lower = np.maximum(upper - int(np.ceil(cms.epsilon * cms.total)), 0)
                out[o] = self._capped(o, lower.T, upper.T, out)
                continue
            resid = cms.estimate_cells(cells, self.residual[o]).reshape(keys.shape)
            pos = self.heavy_lookup[o](keys.reshape(-1)).reshape(keys.shape)
            found = pos >= 0
            h_low = hh.lower[pos] if hh.keys.size else np.zeros(keys.shape, np.int64)
            h_up = hh.upper[pos] if hh.keys.size else np.zeros(keys.shape, np.int64)
            if hh.exact:
                # Every key was tracked: one that is not in the summary never occurred.
                lower = np.where(found, h_low, 0)
                upper = np.where(found, h_up, 0)
            else:
                full = cms.estimate_cells(cells).reshape(keys.shape) if need_upper else resid
                lower = np.where(found, h_low, np.maximum(resid - int(np.ceil(self.light_error[o])), 0))
                upper = np.where(found, h_up, full)
            out[o] = self._capped(o, lower.T, upper.T, out)  # [B, C]
        return out

    def _capped(self, o: int, lower: np.ndarray, upper: np.ndarray, out: dict[int, OrderBounds]) -> OrderBounds:
        """Hierarchical cap: by the order o-1 sub-combinations when counted, else by the singles."""
        prev = out.get(o - 1)
        subs = self.sub_columns[o]
        for k in range(o):
            col = subs[:, k]
            if prev is not None and (col >= 0).all():
                cap_low, cap_up = prev.lower[:, col], prev.upper[:, col]
            else:
                fields = np.array([[x for x in combo if x != combo[k]] for combo in self.layouts[o].combos.tolist()])
                cap_low = out[1].lower[:, fields].min(axis=2)
                cap_up = out[1].upper[:, fields].min(axis=2)
            lower = np.minimum(lower, cap_low)
            upper = np.minimum(upper, cap_up)
        return OrderBounds(lower, upper)

    def field_confidence(
        self,
        tokens: np.ndarray,
        kappa: list[float],
        orders: list[int],
        frequency: Literal["lower", "upper"] = "lower",
        agg: Literal["mean", "min"] = "mean",
        heavy_hitters: bool = True,
    ) -> np.ndarray:
        """Confidence [B, F] in [0, 1]: f / (f + kappa_o) of every counted combination holding
        the field, pooled over the orders used by mean or min."""
        b = self.bounds(tokens, orders, need_upper=frequency == "upper", heavy_hitters=heavy_hitters)
        n = len(tokens)
        if agg == "mean":
            total = np.zeros((n, self.num_fields))
            count = np.zeros(self.num_fields)
        else:
            total = np.ones((n, self.num_fields))
        for o in sorted(orders):
            if o not in b:
                continue
            f = (b[o].lower if frequency == "lower" else b[o].upper).astype(np.float64)
            k = kappa[min(o, len(kappa)) - 1]
            conf = f / (f + k) if k > 0 else (f > 0).astype(np.float64)
            m = self.members[o]
            if agg == "mean":
                total += conf @ m
                count += m.sum(axis=0)
            else:
                for i in range(self.num_fields):
                    cols = m[:, i]
                    if cols.any():
                        np.minimum(total[:, i], conf[:, cols].min(axis=1), out=total[:, i])
        if agg == "mean":
            return total / np.maximum(count, 1)
        return total


class _PositionLookup:
    """Position of each uint64 key in a sorted key array, -1 when absent."""

    def __init__(self, keys: np.ndarray) -> None:
        self.keys = keys
        try:
            from pandas._libs.hashtable import UInt64HashTable

            table = UInt64HashTable(max(keys.size, 1))
            table.map_locations(keys)
            self._fn = lambda q: np.asarray(table.lookup(np.ascontiguousarray(q, dtype=np.uint64)), dtype=np.int64)
        except (ImportError, AttributeError):  # pragma: no cover - depends on the pandas build
            self._fn = self._search

    def _search(self, q: np.ndarray) -> np.ndarray:
        if self.keys.size == 0:
            return np.full(q.size, -1, np.int64)
        pos = np.minimum(np.searchsorted(self.keys, q), self.keys.size - 1)
        return np.where(self.keys[pos] == q, pos, -1)

    def __call__(self, q: np.ndarray) -> np.ndarray:
        return self._fn(q) if self.keys.size else np.full(q.size, -1, np.int64)
