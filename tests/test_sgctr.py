"""SGCTR without a trained package: the refinement's invariants, its settings and the noise tool."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from model.dgenctr import DGenCTR, DGenCTRConfig
from model.refine import Refiner, generator_report
from model.spec import MASK_ID, OOV_ID, PAD_ID
from testtime.noise import corrupt_tokens
from testtime.sgctr import SgctrConfig

SIZES = [40, 25, 6, 90, 12, 30]
NAMES = [f"f{i}" for i in range(len(SIZES))]


@pytest.fixture(scope="module")
def net() -> DGenCTR:
    torch.manual_seed(0)
    return DGenCTR(SIZES, DGenCTRConfig(d_model=16, layers=1, heads=2, head_hidden=32)).eval()


def _tokens(rows: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.stack([torch.randint(3, s, (rows,), generator=g) for s in SIZES], dim=1)
    t[::7, 1] = OOV_ID
    return t


@torch.no_grad()
def test_zero_passes_is_the_plain_model(net: DGenCTR):
    tokens = _tokens(50)
    for cfg in (SgctrConfig(passes=0), SgctrConfig(passes=0, selection="random", weight="batch")):
        assert torch.equal(Refiner(net, cfg, NAMES)(tokens), net(tokens))


@torch.no_grad()
def test_refinement_changes_scores_and_is_batch_independent(net: DGenCTR):
    """weight=full depends on nothing outside the row, so a row scores the same alone or in any
    batch (what lets the service and `ctr evaluate` agree); weight=batch does not promise it."""
    tokens = _tokens(64)
    for cfg in (SgctrConfig(passes=1), SgctrConfig(passes=3, score="rotate"), SgctrConfig(passes=2, selection="random")):
        ref = Refiner(net, cfg, NAMES).eval()
        full = ref(tokens)
        assert (full - net(tokens)).abs().max() > 1e-4, cfg
        alone = torch.cat([ref(tokens[i : i + 1]) for i in range(0, 64, 9)])
        torch.testing.assert_close(alone, full[::9], rtol=0, atol=1e-5)
        shuffled = torch.randperm(64, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(ref(tokens[shuffled]), full[shuffled], rtol=0, atol=1e-5)


@torch.no_grad()
def test_only_selected_fields_change(net: DGenCTR):
    tokens = _tokens(32)
    tokens[0] = PAD_ID  # a service pad row: nothing is re-defined
    obs = net.embedding(tokens)
    cfg = SgctrConfig(passes=1, ratio=0.3)  # ceil(0.3 * 6) = 2 fields per row
    v = Refiner(net, cfg, NAMES).refine_values(tokens)
    changed = (v - obs).abs().amax(dim=-1) > 0
    assert not changed[0].any()
    assert (changed[1:].sum(dim=1) <= 2).all() and changed[1:].sum() > 0
    only = Refiner(net, SgctrConfig(passes=2, fields=["f0", "f3"]), NAMES).refine_values(tokens)
    moved = (only - obs).abs().amax(dim=-1) > 0
    assert not moved[:, [1, 2, 4, 5]].any() and moved[:, [0, 3]].any()
    with pytest.raises(ValueError, match="not in the spec"):
        Refiner(net, SgctrConfig(fields=["nope"]), NAMES)


@torch.no_grad()
def test_blend_weight_is_the_generator_probability(net: DGenCTR):
    """weight=zero replaces the selected fields by the generated mean outright; weight=full
    keeps a share w in [0, 1] of the observed embedding, so it lands between the two."""
    tokens = _tokens(16)
    obs = net.embedding(tokens)
    zero = Refiner(net, SgctrConfig(passes=1, selection="all", weight="zero"), NAMES).refine_values(tokens)
    full = Refiner(net, SgctrConfig(passes=1, selection="all", weight="full"), NAMES).refine_values(tokens)
    # full = w * obs + (1 - w) * zero, per field, with one w for all embedding coordinates
    num = ((full - zero) * (obs - zero)).sum(-1)
    den = ((obs - zero) ** 2).sum(-1).clamp(min=1e-12)
    w = num / den
    assert ((w >= -1e-4) & (w <= 1 + 1e-4)).all()
    torch.testing.assert_close(full, w.unsqueeze(-1) * obs + (1 - w.unsqueeze(-1)) * zero, rtol=0, atol=1e-5)


@torch.no_grad()
def test_generator_report_reads_the_heads(net: DGenCTR):
    rep = generator_report(net, _tokens(40), NAMES)
    assert rep["rows"] == 40 and 0 <= rep["top1"] <= 1 and 0 < rep["p_true"] < 1
    assert set(rep["per_field_top1"]) == set(NAMES)


def test_config_keys_and_cost():
    a, b = SgctrConfig(passes=1), SgctrConfig(passes=3)
    assert a.graph_key() == b.graph_key() and a.graph_file() != b.graph_file()
    assert SgctrConfig(selection="random").graph_key() != a.graph_key()
    assert SgctrConfig(passes=2, groups=3).runs_per_row(10) == 7
    assert SgctrConfig(passes=2, score="rotate").runs_per_row(10) == 3
    assert SgctrConfig(passes=0).active is False
    with pytest.raises(ValidationError):
        SgctrConfig(passes=4)
    with pytest.raises(ValidationError):
        SgctrConfig(pathz=2)


# ---------------------------------------------------------------------- noise tool
def _grid(rows: int = 20_000) -> np.ndarray:
    rng = np.random.default_rng(3)
    return np.stack([rng.integers(3, s, rows) for s in (1000, 500, 800)], axis=1).astype(np.int64)


@pytest.mark.parametrize("share", [0.05, 0.1, 0.2])
def test_noise_share_within_tolerance(share: float):
    tokens = _grid()
    out, chosen, rep = corrupt_tokens(tokens, share, seed=5)
    cells = tokens.size
    tol = 4 * np.sqrt(share * (1 - share) / cells)
    assert abs(rep.chosen - share) < tol and abs(chosen.mean() - share) < tol
    # marginal draws repeat the value with about 1/vocab probability: changed is just below chosen
    assert rep.changed <= rep.chosen and rep.changed > share - 3 * tol
    assert np.array_equal(out[~chosen], tokens[~chosen])
    for f in range(tokens.shape[1]):  # replaced values come from the field's own column
        assert np.isin(out[chosen[:, f], f], tokens[:, f]).all()


def test_noise_is_seeded_and_skips_reserved_cells():
    tokens = _grid(5_000)
    tokens[:10] = PAD_ID
    tokens[10:20, 0] = MASK_ID
    a, ca, _ = corrupt_tokens(tokens, 0.2, seed=1)
    b, cb, _ = corrupt_tokens(tokens, 0.2, seed=1)
    c, _, _ = corrupt_tokens(tokens, 0.2, seed=2)
    assert np.array_equal(a, b) and np.array_equal(ca, cb) and not np.array_equal(a, c)
    assert not ca[:10].any() and not ca[10:20, 0].any()
    u, cu, rep = corrupt_tokens(tokens, 0.2, seed=1, vocab_sizes=[1000, 500, 800], mode="uniform")
    assert rep.mode == "uniform" and (u[cu] >= 3).all() and (u[:, 1] < 500).all()
    f, cf, _ = corrupt_tokens(tokens, 0.5, seed=1, fields=[2])
    assert not cf[:, :2].any() and cf[:, 2].mean() > 0.4
    assert corrupt_tokens(tokens, 0.0)[2].changed == 0.0
    with pytest.raises(ValueError):
        corrupt_tokens(tokens, 1.5)


@torch.no_grad()
def test_relative_weight_keeps_more_of_the_observed_value(net: DGenCTR):
    """weight=relative divides p(observed) by the mode's p, so w is never below weight=full's."""
    tokens = _tokens(16)
    obs = net.embedding(tokens)
    dist = {}
    for weight in ("full", "relative"):
        v = Refiner(net, SgctrConfig(passes=1, selection="all", weight=weight), NAMES).refine_values(tokens)
        dist[weight] = (v - obs).norm(dim=-1)
    assert (dist["relative"] <= dist["full"] + 1e-6).all() and (dist["relative"] < dist["full"]).any()
