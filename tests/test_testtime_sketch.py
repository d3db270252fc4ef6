"""Combination statistics: sketch bounds against exact counts, shard merging, the stored file."""

from __future__ import annotations

import collections
import math

import numpy as np
import pandas as pd
import pytest

from model.spec import FeatureSpec, FieldSpec
from testtime.confidence import ComboIndex
from testtime.sketch import CountMinSketch, HeavyHitters
from testtime.stats import ComboStats, StatsBuilder, StatsConfig, StatsError


def _data(rows: int = 6000, seed: int = 0) -> tuple[FeatureSpec, np.ndarray, np.ndarray]:
    """Zipf-distributed categorical fields: a heavy head and a long tail, like real logs."""
    rng = np.random.default_rng(seed)
    sizes = {"u": 300, "i": 200, "c": 8, "d": 30}
    table = pd.DataFrame({k: np.minimum(rng.zipf(1.3, rows), v) for k, v in sizes.items()})
    table["label"] = (rng.random(rows) < 0.3).astype(int)
    spec = FeatureSpec("t", [FieldSpec(k, "context", "categorical") for k in sizes]).fit(table)
    return spec, spec.encode(table), table["label"].to_numpy()


def _true_counts(tokens: np.ndarray, combo: tuple[int, ...]) -> collections.Counter:
    return collections.Counter(map(tuple, tokens[:, list(combo)].tolist()))


def _cfg(**over) -> StatsConfig:
    base = dict(width_log2=8, depth=4, heavy_capacity=40, pair_top_k=None, triple_top_k=None, chunk_rows=1000)
    return StatsConfig(**{**base, **over})


def test_count_min_never_undercounts_and_stays_within_its_bound():
    spec, tokens, _ = _data()
    b = StatsBuilder(spec, _cfg())
    b.add(tokens)
    stats = b.finish()
    cms, lay = stats.sketches[2], stats.layouts[2]
    keys = lay.keys(tokens)  # [N, C]
    est = cms.estimate(keys)
    bound = cms.epsilon * cms.total
    over_bound = 0
    checked = 0
    collided = 0
    for c, combo in enumerate(lay.combos.tolist()):
        truth = _true_counts(tokens, tuple(combo))
        true_per_row = np.array([truth[tuple(r)] for r in tokens[:, combo].tolist()])
        assert (est[:, c] >= true_per_row).all(), "count-min undercounted"
        # One check per distinct combination value, not per row.
        _, first = np.unique(keys[:, c], return_index=True)
        over_bound += int((est[first, c] > true_per_row[first] + bound).sum())
        collided += int((est[first, c] > true_per_row[first]).sum())
        checked += first.size
    # The bound fails with probability <= exp(-depth) per estimate; allow three times that.
    assert over_bound <= 3 * math.exp(-cms.depth) * checked + 1
    # The width is small enough that collisions really happen (the test would be vacuous otherwise).
    assert collided > 0


def test_lower_and_upper_bounds_bracket_the_true_counts():
    spec, tokens, _ = _data(seed=1)
    b = StatsBuilder(spec, _cfg())
    b.add(tokens)
    stats = b.finish()
    assert not stats.heavy[2].exact  # capacity 40 < distinct pairs: the inexact path is tested
    index = ComboIndex(stats)
    bounds = index.bounds(tokens)
    assert np.array_equal(bounds[1].lower, bounds[1].upper)  # order 1 is exact
    for o in (2, 3):
        lay = stats.layouts[o]
        fails = 0
        for c, combo in enumerate(lay.combos.tolist()):
            truth = _true_counts(tokens, tuple(combo))
            true_per_row = np.array([truth[tuple(r)] for r in tokens[:, combo].tolist()])
            assert (bounds[o].upper[:, c] >= true_per_row).all()
            fails += int((bounds[o].lower[:, c] > true_per_row).sum())
        assert fails <= 3 * math.exp(-4) * bounds[o].lower.size
        assert (bounds[o].lower <= bounds[o].upper).all()
        assert (bounds[o].lower > 0).any()  # the lower bound is not trivially zero everywhere
    # Heavy hitters: every tracked key's bounds hold (deterministic, not probabilistic).
    hh, lay = stats.heavy[2], stats.layouts[2]
    keys = lay.keys(tokens).reshape(-1)
    uniq, counts = np.unique(keys, return_counts=True)
    truth = dict(zip(uniq.tolist(), counts.tolist()))
    for k, lo, up in zip(hh.keys.tolist(), hh.lower.tolist(), hh.upper.tolist()):
        assert lo <= truth[k] <= up
    # And they are the heaviest: the most frequent pair is tracked.
    assert int(uniq[np.argmax(counts)]) in set(hh.keys.tolist())


def test_heavy_hitters_are_exact_when_they_hold_every_key():
    spec, tokens, _ = _data(rows=2000, seed=2)
    b = StatsBuilder(spec, _cfg(heavy_capacity=100_000))
    b.add(tokens)
    stats = b.finish()
    for o in (2, 3):
        hh = stats.heavy[o]
        assert hh.exact
        keys = stats.layouts[o].keys(tokens).reshape(-1)
        uniq, counts = np.unique(keys, return_counts=True)
        assert np.array_equal(hh.keys, uniq) and np.array_equal(hh.lower, counts) and np.array_equal(hh.upper, counts)
        b_o = ComboIndex(stats).bounds(tokens)[o]
        assert np.array_equal(b_o.lower, b_o.upper)


@pytest.mark.parametrize("capacity", [100_000, 40])
def test_two_shards_merged_equal_one_pass(capacity, tmp_path):
    spec, tokens, labels = _data(seed=3)
    cfg = _cfg(heavy_capacity=capacity)
    one = StatsBuilder(spec, cfg)
    one.add(tokens, labels)
    one = one.finish()
    shards = []
    for part in (slice(0, 2500), slice(2500, None)):
        s = StatsBuilder(spec, cfg)
        s.add(tokens[part], labels[part])
        shards.append(s.finish())
    # Through the files, as `ctr stats merge` does.
    shards[0].save(tmp_path / "a.npz")
    shards[1].save(tmp_path / "b.npz")
    merged = ComboStats.load(tmp_path / "a.npz", spec).merge(ComboStats.load(tmp_path / "b.npz", spec))
    assert merged.rows == one.rows and merged.positives == one.positives
    assert np.array_equal(merged.singles, one.singles)
    for o in (2, 3):
        assert np.array_equal(merged.sketches[o].table, one.sketches[o].table)
        if capacity >= 100_000:
            for attr in ("keys", "lower", "upper"):
                assert np.array_equal(getattr(merged.heavy[o], attr), getattr(one.heavy[o], attr))
        else:
            keys = one.layouts[o].keys(tokens).reshape(-1)
            uniq, counts = np.unique(keys, return_counts=True)
            truth = dict(zip(uniq.tolist(), counts.tolist()))
            hh = merged.heavy[o]
            assert hh.keys.size == capacity
            assert all(lo <= truth[k] <= up for k, lo, up in zip(hh.keys.tolist(), hh.lower.tolist(), hh.upper.tolist()))
    # The chunk size does not change the sketch either.
    other = StatsBuilder(spec, _cfg(heavy_capacity=capacity, chunk_rows=777))
    other.add(tokens)
    assert np.array_equal(other.finish().sketches[2].table, one.sketches[2].table)


def test_merge_refuses_other_settings():
    spec, tokens, _ = _data(rows=500)
    a, b = StatsBuilder(spec, _cfg()), StatsBuilder(spec, _cfg(width_log2=9))
    a.add(tokens)
    b.add(tokens)
    with pytest.raises(StatsError):
        a.finish().merge(b.finish())
    with pytest.raises(ValueError):
        CountMinSketch.empty(4, 256, 1).merge(CountMinSketch.empty(4, 256, 2))


def test_heavy_hitter_merge_bounds_hold_under_truncation():
    rng = np.random.default_rng(5)
    keys = rng.zipf(1.5, 20000).astype(np.uint64)
    truth = collections.Counter(keys.tolist())
    sketch = CountMinSketch.empty(4, 1 << 12, 9)
    parts = []
    for half in (keys[:9000], keys[9000:]):
        cms, hh = CountMinSketch.empty(4, 1 << 12, 9), HeavyHitters.empty(30)
        for chunk in np.array_split(half, 7):
            cms.update(chunk)
            u, c = np.unique(chunk, return_counts=True)
            hh.offer(u, c, cms.estimate)
        hh.finalize(cms)
        parts.append(hh)
        sketch = sketch.merge(cms)
    merged = parts[0].merge(parts[1], sketch)
    assert merged.keys.size == 30
    for k, lo, up in zip(merged.keys.tolist(), merged.lower.tolist(), merged.upper.tolist()):
        assert lo <= truth[k] <= up
    top = [k for k, _ in truth.most_common(10)]
    assert set(top) <= set(merged.keys.tolist())


def test_stored_file_round_trips_and_refuses_damage(tmp_path):
    spec, tokens, labels = _data(rows=1500)
    b = StatsBuilder(spec, _cfg())
    b.add(tokens, labels)
    stats = b.finish()
    manifest = stats.save(tmp_path / "s.npz")
    assert manifest["sha256"] and (tmp_path / "s.json").is_file()
    back = ComboStats.load(tmp_path / "s.npz", spec)
    assert np.array_equal(back.sketches[3].table, stats.sketches[3].table)
    assert np.array_equal(ComboIndex(back).bounds(tokens)[2].lower, ComboIndex(stats).bounds(tokens)[2].lower)
    raw = bytearray((tmp_path / "s.npz").read_bytes())
    raw[len(raw) // 2] ^= 0x01
    (tmp_path / "s.npz").write_bytes(bytes(raw))
    with pytest.raises(StatsError, match="sha256"):
        ComboStats.load(tmp_path / "s.npz", spec)
    # A spec with other vocabularies is refused.
    stats.save(tmp_path / "t.npz")
    other = FeatureSpec("t", [FieldSpec(k, "context", "categorical") for k in ("u", "i", "c", "d")]).fit(
        pd.DataFrame({k: [1, 2] for k in ("u", "i", "c", "d")}))
    with pytest.raises(StatsError, match="another spec"):
        ComboStats.load(tmp_path / "t.npz", other)


def test_default_field_subsets_follow_cardinality():
    spec, _, _ = _data(rows=3000)
    stats = StatsBuilder(spec, StatsConfig(pair_top_k=3, triple_top_k=3, width_log2=8, heavy_capacity=10)).finish()
    names = spec.field_names
    big3 = sorted(names, key=lambda n: -spec.field(n).vocab_size)[:3]
    pairs = {tuple(names[i] for i in c) for c in stats.layouts[2].combos.tolist()}
    assert all(set(p) <= set(big3) for p in pairs) and len(pairs) == 3
    assert stats.layouts[3].size == 1
