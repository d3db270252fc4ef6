"""Realistic /score requests: Zipf-popular users and items drawn from the real feature tables.

Ranking traffic is heavily skewed: a few users call often and a few items appear in most
candidate lists. That skew is what makes the service's item cache and the batcher behave as
they do in production, so a uniform generator would flatter both. Candidate counts vary
per call (log-uniform between a minimum and a maximum: many short lists, some long ones).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


def read_ids(path: str | Path, entity: str) -> np.ndarray:
    """The `<entity>_id` column of a users/items table (parquet or csv), as strings."""
    import pandas as pd

    p = Path(path)
    col = f"{entity}_id"
    df = pd.read_parquet(p, columns=[col]) if p.suffix == ".parquet" else pd.read_csv(p, usecols=[col])
    ids = df[col].dropna().astype(str).unique()
    if len(ids) == 0:
        raise ValueError(f"{p}: no {col} values")
    return ids


def context_choices(spec_path: str | Path | None) -> dict[str, list[Any]]:
    """Context field values to draw from: the fitted spec's vocabularies (source=context)."""
    if not spec_path:
        return {}
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    out: dict[str, list[Any]] = {}
    for f in spec.get("fields", []):
        if f.get("source") != "context":
            continue
        if f.get("kind") == "categorical" and f.get("vocab"):
            out[f["name"]] = list(f["vocab"])
        elif f.get("kind") == "numeric" and f.get("boundaries"):
            out[f["name"]] = [float(b) for b in f["boundaries"]]
    return out


class Zipf:
    """Draws from a fixed population with P(rank k) proportional to 1 / k**a.

    Ranks are assigned by a seeded shuffle, so "popular" is a property of the id set rather
    than of its order in the table.
    """

    def __init__(self, ids: Sequence[str] | np.ndarray, a: float, rng: np.random.Generator) -> None:
        self.ids = rng.permutation(np.asarray(ids, dtype=object))
        w = 1.0 / np.arange(1, len(self.ids) + 1, dtype=np.float64) ** a
        self.cdf = np.cumsum(w / w.sum())
        self.rng = rng

    def __len__(self) -> int:
        return len(self.ids)

    def draw(self, n: int) -> np.ndarray:
        idx = np.searchsorted(self.cdf, self.rng.random(n), side="right")
        return self.ids[np.minimum(idx, len(self.ids) - 1)]

    def draw_distinct(self, n: int) -> list[str]:
        """n distinct ids, Zipf-weighted: oversample, keep first occurrences, top up uniformly."""
        n = min(n, len(self.ids))
        seen: dict[str, None] = {}
        for _ in range(4):
            for x in self.draw(2 * n):
                seen.setdefault(x, None)
                if len(seen) == n:
                    return list(seen)
        rest = [x for x in self.rng.permutation(self.ids) if x not in seen]
        return list(seen) + rest[: n - len(seen)]


@dataclass
class TrafficConfig:
    users_table: str
    items_table: str
    spec: str | None = None
    zipf_users: float = 1.05
    zipf_items: float = 1.1
    min_items: int = 20
    max_items: int = 500
    # Share of candidates that are not in the store yet (fresh items): exercises the OOV path.
    cold_item_frac: float = 0.01
    seed: int = 0


@dataclass
class TrafficGenerator:
    cfg: TrafficConfig
    rng: np.random.Generator = field(init=False)

    def __post_init__(self) -> None:
        c = self.cfg
        if not 1 <= c.min_items <= c.max_items:
            raise ValueError(f"need 1 <= min_items <= max_items, got {c.min_items}, {c.max_items}")
        self.rng = np.random.default_rng(c.seed)
        self.users = Zipf(read_ids(c.users_table, "user"), c.zipf_users, self.rng)
        self.items = Zipf(read_ids(c.items_table, "item"), c.zipf_items, self.rng)
        self.context = context_choices(c.spec)
        self._n = 0

    def num_items(self) -> int:
        lo, hi = np.log(self.cfg.min_items), np.log(self.cfg.max_items + 1)
        return int(min(self.cfg.max_items, np.exp(self.rng.uniform(lo, hi))))

    def request(self, variant: str | None = None) -> dict[str, Any]:
        self._n += 1
        k = self.num_items()
        items = self.items.draw_distinct(k)
        cold = self.rng.random(len(items)) < self.cfg.cold_item_frac
        ids = [f"cold-{self._n}-{i}" if c else x for i, (x, c) in enumerate(zip(items, cold, strict=True))]
        body: dict[str, Any] = {
            "request_id": f"lt-{self.cfg.seed}-{self._n}",
            "user_id": str(self.users.draw(1)[0]),
            "context": {name: vals[int(self.rng.integers(len(vals)))] for name, vals in self.context.items()},
            "items": [{"item_id": i} for i in ids],
        }
        if variant:
            body["variant"] = variant
        return body
