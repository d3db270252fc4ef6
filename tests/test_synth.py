"""The synthetic generator: deterministic, realistic rates, and a learnable hidden model."""

from __future__ import annotations

import numpy as np
import pandas as pd

from model.synth import SynthConfig, generate, synthesize


def small(seed: int = 3, **kw) -> SynthConfig:
    return SynthConfig(seed=seed, rows=6_000, users=300, items=150, **kw)


def test_same_seed_same_tables_other_seed_differs():
    a, b, c = generate(small(3)), generate(small(3)), generate(small(4))
    for name in ("train", "valid", "test", "users", "items"):
        pd.testing.assert_frame_equal(a[name], b[name])
    assert not a["train"]["label"].equals(c["train"]["label"])


def test_label_rate_and_probabilities_match():
    t = generate(small(5, label_rate=0.2))
    rows = pd.concat([t["train"], t["valid"], t["test"]])
    assert abs(rows["p_true"].mean() - 0.2) < 0.005  # the intercept is solved for this
    assert abs(rows["label"].mean() - 0.2) < 0.02  # draws from it
    assert rows["p_true"].between(0, 1).all()


def test_splits_partition_the_rows():
    t = generate(small(6))
    sizes = [len(t[s]) for s in ("train", "valid", "test")]
    assert sum(sizes) == 6_000 and sizes[1] == sizes[2] == 900


def test_popularity_is_skewed():
    t = generate(small(7))
    counts = t["train"]["item_id"].value_counts()
    top_share = counts.iloc[: len(counts) // 10].sum() / counts.sum()
    assert top_share > 0.3  # Zipf-like: the top 10% of items take a large share


def test_interactions_matter_beyond_marginals():
    """Per-segment and per-category rates cannot explain the segment x category cells."""
    t = generate(SynthConfig(seed=8, rows=60_000, users=500, items=300))
    df = t["train"]
    cell = df.groupby(["user_segment", "item_category"])["p_true"].mean()
    seg = df.groupby("user_segment")["p_true"].mean()
    cat = df.groupby("item_category")["p_true"].mean()
    base = df["p_true"].mean()
    additive = np.array([seg[s] + cat[c] - base for s, c in cell.index])
    assert np.std(cell.to_numpy() - additive) > 0.02


def test_bayes_auc_reported_and_tables_written(tmp_path):
    meta = synthesize(small(9), tmp_path)
    assert 0.7 < meta["bayes_auc"]["test"] < 0.95
    for name in ("train", "valid", "test", "users", "items"):
        assert (tmp_path / f"{name}.parquet").exists()
    users = pd.read_parquet(tmp_path / "users.parquet")
    assert users["user_id"].is_unique and len(users) == 300
