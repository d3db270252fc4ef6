"""`heavy_hitters: false` (the "heap off" ablation): confidence from the count-min sketch alone."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from model.spec import OOV_ID, FeatureSpec, FieldSpec
from testtime.confidence import ComboIndex
from testtime.matt import MattScorer, TestTimeConfig
from testtime.stats import StatsBuilder, StatsConfig


@pytest.fixture(scope="module")
def counted() -> tuple[np.ndarray, object, dict[tuple[int, int], int]]:
    """A narrow sketch (256 columns) over many distinct pairs, so keys collide, and a summary
    large enough to track every pair exactly."""
    rng = np.random.default_rng(3)
    n = 6000
    table = pd.DataFrame({"u": rng.integers(0, 300, n), "i": rng.integers(0, 300, n)})
    table["label"] = (rng.random(n) < 0.2).astype(int)
    spec = FeatureSpec("h", [FieldSpec(k, "context", "categorical") for k in ("u", "i")]).fit(table)
    tokens = spec.encode(table)
    b = StatsBuilder(spec, StatsConfig(orders=(1, 2), width_log2=8, heavy_capacity=1 << 16, pair_top_k=None))
    b.add(tokens, table["label"].to_numpy())
    stats = b.finish()
    pairs, counts = np.unique(tokens, axis=0, return_counts=True)
    truth = {(int(a), int(c)): int(k) for (a, c), k in zip(pairs, counts)}
    return tokens, stats, truth


def test_heap_off_reads_the_sketch_and_heap_on_the_exact_counts(counted):
    tokens, stats, truth = counted
    assert stats.heavy[2].exact  # every pair was tracked: with the heap the counts are exact
    index = ComboIndex(stats)
    true = np.array([truth[(int(a), int(c))] for a, c in tokens[:2000]])
    on = index.bounds(tokens[:2000], [1, 2])[2]
    off = index.bounds(tokens[:2000], [1, 2], heavy_hitters=False)[2]
    assert np.array_equal(on.lower[:, 0], true) and np.array_equal(on.upper[:, 0], true)
    # The sketch alone never undercounts and, this narrow, overcounts most pairs.
    assert (off.upper[:, 0] >= true).all() and (off.upper[:, 0] > true).mean() > 0.5
    assert (off.lower[:, 0] <= true).all() and (off.lower[:, 0] <= off.upper[:, 0]).all()
    # Both are still capped by the singles.
    singles = index.bounds(tokens[:2000], [1])[1].upper
    assert (off.upper[:, 0] <= singles.min(axis=1)).all()


def test_the_setting_reaches_the_paths(counted):
    tokens, stats, _ = counted
    rows = tokens[:500]
    on = MattScorer.from_stats(stats, TestTimeConfig(paths=4, kappa=[5], orders=[1, 2]), replacement=OOV_ID)
    off = MattScorer.from_stats(stats, TestTimeConfig(paths=4, kappa=[5], orders=[1, 2], heavy_hitters=False), replacement=OOV_ID)
    assert TestTimeConfig().heavy_hitters is True
    c_on, c_off = on.confidence(rows), off.confidence(rows)
    # Overcounted pairs look more frequent without the heap, so fields are trusted more.
    assert (c_off >= c_on - 1e-12).all() and (c_off > c_on + 1e-9).any()
    kept_on = (on.expand(rows)[0][500:] != OOV_ID).mean()
    kept_off = (off.expand(rows)[0][500:] != OOV_ID).mean()
    assert kept_off > kept_on
