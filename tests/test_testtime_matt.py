"""MATT paths: confidence, expansion, folding and the trigger, on real statistics of a small log."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from model.spec import MASK_ID, NUM_RESERVED, OOV_ID, FeatureSpec, FieldSpec
from testtime.matt import MattScorer, TestTimeConfig, replacement_token
from testtime.stats import StatsBuilder, StatsConfig


@pytest.fixture(scope="module")
def log_data() -> tuple[FeatureSpec, np.ndarray, object]:
    """A head of frequent values and a tail of values seen a few times."""
    rng = np.random.default_rng(0)
    n = 8000
    table = pd.DataFrame({
        "u": np.where(rng.random(n) < 0.8, rng.integers(0, 5, n), rng.integers(5, 2000, n)),
        "i": np.where(rng.random(n) < 0.8, rng.integers(0, 5, n), rng.integers(5, 2000, n)),
        "c": rng.integers(0, 3, n),
    })
    table["label"] = (rng.random(n) < 0.3).astype(int)
    spec = FeatureSpec("m", [FieldSpec(k, "context", "categorical") for k in ("u", "i", "c")]).fit(table)
    tokens = spec.encode(table)
    b = StatsBuilder(spec, StatsConfig(width_log2=14, heavy_capacity=4096, pair_top_k=None, triple_top_k=None))
    b.add(tokens, table["label"].to_numpy())
    return spec, tokens, b.finish()


def _scorer(stats, **cfg) -> MattScorer:
    """Conservative settings (lower bounds, larger kappa) so that the tail is clearly distrusted."""
    cfg = {"kappa": [20, 10, 5], "frequency": "lower", **cfg}
    return MattScorer.from_stats(stats, TestTimeConfig(**cfg), replacement=OOV_ID)


def _model(tokens: np.ndarray) -> np.ndarray:
    """A fixed scoring function of the tokens (the fold arithmetic needs known inputs)."""
    z = np.sin(tokens @ np.array([0.37, -0.11, 0.53])[: tokens.shape[1]])
    return (1 / (1 + np.exp(-z))).astype(np.float32)


def test_confidence_is_high_for_the_head_and_low_for_the_tail(log_data):
    _, tokens, stats = log_data
    conf = _scorer(stats).confidence(tokens)
    assert conf.shape == tokens.shape and (conf >= 0).all() and (conf <= 1).all()
    head = (tokens[:, 0] < NUM_RESERVED + 5) & (tokens[:, 1] < NUM_RESERVED + 5)
    assert conf[head].min(axis=1).mean() > 0.7
    assert conf[~head].min(axis=1).mean() < 0.4


def test_path_zero_is_the_input_and_only_low_confidence_fields_change(log_data):
    _, tokens, stats = log_data
    rows = tokens[:500]
    scorer = _scorer(stats, paths=8, keep_above=0.9)
    batch, plan = scorer.expand(rows)
    assert batch.shape == (500 * 8, 3) and plan.extra_rows == 500 * 7
    assert np.array_equal(batch[:500], rows)
    extra = batch[500:].reshape(500, 7, 3)
    conf = scorer.confidence(rows)
    changed = extra != rows[:, None, :]
    assert changed.any()
    assert (extra[changed] == OOV_ID).all()
    assert (np.broadcast_to(conf[:, None, :], changed.shape)[changed] < 0.9).all()
    # Fields kept with probability = confidence: the share kept follows it.
    low = (conf < 0.5) & (rows >= NUM_RESERVED)
    kept_low = 1 - changed.mean(axis=1)[low].mean()
    assert abs(kept_low - conf[low].mean()) < 0.05


def test_one_path_folds_back_to_the_plain_scores(log_data):
    _, tokens, stats = log_data
    rows = tokens[:300]
    scorer = _scorer(stats, paths=1)
    batch, plan = scorer.expand(rows)
    assert np.array_equal(batch, rows) and plan.extra_rows == 0
    plain = _model(rows)
    assert np.array_equal(scorer.fold(plan, _model(batch)), plain)
    assert np.array_equal(_scorer(stats, method="none", paths=8).score(rows, _model), plain)


def test_fold_averages_each_rows_paths(log_data):
    _, tokens, stats = log_data
    rows = tokens[:64]
    for aggregate in ("mean", "weighted"):
        scorer = _scorer(stats, paths=4, aggregate=aggregate)
        batch, plan = scorer.expand(rows)
        probs = _model(batch)
        out = scorer.fold(plan, probs)
        paths = np.concatenate([probs[:64, None], probs[64:].reshape(64, 3)], axis=1)
        if aggregate == "mean":
            expected = paths.mean(axis=1)
        else:
            expected = (paths * plan.weights).sum(axis=1) / plan.weights.sum(axis=1)
        np.testing.assert_allclose(out, expected, rtol=1e-6)
        assert ((out >= paths.min(axis=1) - 1e-7) & (out <= paths.max(axis=1) + 1e-7)).all()


def test_paths_do_not_depend_on_the_batch_a_row_arrives_in(log_data):
    _, tokens, stats = log_data
    rows = tokens[:40]
    scorer = _scorer(stats, paths=6)
    together = scorer.score(rows, _model)
    alone = np.concatenate([scorer.score(rows[i : i + 1], _model) for i in range(40)])
    np.testing.assert_array_equal(together, alone)
    other_seed = _scorer(stats, paths=6, seed=1).expand(rows)[0]
    assert not np.array_equal(other_seed, scorer.expand(rows)[0])
    np.testing.assert_array_equal(scorer.expand(rows)[0], _scorer(stats, paths=6).expand(rows)[0])


def test_uncertain_trigger_expands_only_uncertain_rows(log_data):
    _, tokens, stats = log_data
    rows = tokens[:1000]
    scorer = _scorer(stats, paths=4, trigger="uncertain", uncertain_min_conf=0.5, uncertain_logit_band=0)
    conf = scorer.confidence(rows)
    batch, plan = scorer.expand(rows)
    want = np.flatnonzero(conf.min(axis=1) < 0.5)
    assert 0 < want.size < 1000
    np.testing.assert_array_equal(plan.selected, want)
    assert len(batch) == 1000 + 3 * want.size
    out = scorer.fold(plan, _model(batch))
    untouched = np.setdiff1d(np.arange(1000), want)
    np.testing.assert_array_equal(out[untouched], _model(rows)[untouched])
    c = scorer.counters.as_dict()
    assert c["rows"] == 1000 and c["rows_with_paths"] == want.size and c["extra_rows"] == 3 * want.size

    # With the logit band the plain scores are needed first, and the extra rows come alone.
    banded = _scorer(stats, paths=4, trigger="uncertain", uncertain_min_conf=0.0, uncertain_logit_band=0.3)
    with pytest.raises(ValueError, match="plain"):
        banded.expand(rows)
    plain = _model(rows)
    extra, plan = banded.expand(rows, plain)
    rate = stats.positive_rate
    near = np.abs(np.log(plain / (1 - plain)) - np.log(rate / (1 - rate))) < 0.3
    np.testing.assert_array_equal(plan.selected, np.flatnonzero(near))
    assert len(extra) == 3 * near.sum()
    # Looking up confidences for the selected rows only gives those rows the same paths.
    every, _ = _scorer(stats, paths=4).expand(rows)
    np.testing.assert_array_equal(extra.reshape(-1, 3, 3), every[1000:].reshape(1000, 3, 3)[near])
    np.testing.assert_allclose(banded.score(rows, _model), banded.fold(plan, _model(extra)))


def test_uniform_sampling_ignores_confidence(log_data):
    _, tokens, stats = log_data
    rows = tokens[:400]
    batch, _ = _scorer(stats, paths=5, sampling="uniform", uniform_keep=0.5).expand(rows)
    changed = batch[400:].reshape(400, 4, 3) != rows[:, None, :]
    assert abs(changed.mean() - 0.5) < 0.05  # every field, head or tail, dropped half the time


def test_config_validation_and_replacement_token(log_data):
    _, _, stats = log_data
    with pytest.raises(ValidationError):
        TestTimeConfig(paths=0)
    with pytest.raises(ValidationError):
        TestTimeConfig(trigger="sometimes")
    with pytest.raises(ValidationError):
        TestTimeConfig(orders=[4])
    assert TestTimeConfig(kappa=3).kappa == [3.0]
    with pytest.raises(ValueError, match="orders"):
        MattScorer.from_stats(StatsBuilder(log_data[0], StatsConfig(orders=(1,))).finish(), TestTimeConfig())
    assert replacement_token({"model_type": "dnn", "metrics": {"variant": "dnn-fmask"}}) == MASK_ID
    assert replacement_token({"model_type": "dnn", "metrics": {"variant": "dnn"}}) == OOV_ID
    assert replacement_token({"model_type": "dgenctr", "metrics": {"variant": "dgenctr-fmask"}}) == OOV_ID
    assert replacement_token({}, "mask") == MASK_ID


def test_upper_bound_frequencies_give_at_least_the_lower_bound_confidence(log_data):
    _, tokens, stats = log_data
    rows = tokens[:2000]
    low = _scorer(stats, frequency="lower").confidence(rows)
    up = _scorer(stats, frequency="upper").confidence(rows)
    assert (up >= low - 1e-12).all() and (up > low).any()
    for agg in ("mean", "min"):
        c = _scorer(stats, field_agg=agg).confidence(rows)
        assert c.shape == rows.shape and (c >= 0).all() and (c <= 1).all()
    assert (_scorer(stats, field_agg="min").confidence(rows) <= _scorer(stats, field_agg="mean").confidence(rows) + 1e-12).all()
