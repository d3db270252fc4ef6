"""A family of synthetic CTR logs, each with a structure real logs have, and a known answer.

`model.synth` draws one hidden model. This module draws from one generator whose structures
can be switched on one at a time (a preset per structure) or all together, so a model's gap
to the Bayes AUC can be traced to the structure it fails to learn:

- latent: user x item-category preference factors, part explained by the user's region;
- context: context x item interactions (a daily cycle of item tastes, device x category and
  weekday x category tables);
- nonlinear: non-linear numeric effects (price against the user's income, a category-specific
  wave over age);
- noisy: logged values corrupted at random (context per impression, user and item attributes
  per entity) while clicks follow the clean values;
- longtail: 10x the users and 17x the items under a flatter Zipf law, id effects stronger and
  only partly explained by attributes, so most ids are seen a handful of times.

Every member has the same columns, so one spec layout serves them all (`model/specs/`).

Each row carries `p_true`, the probability its label was drawn from, and `p_bayes`, the best
probability any model can give from the logged fields: `E[p_true | logged values]`. They are
equal unless context values were corrupted; then `p_bayes` averages `p_true` over the clean
values the logged one may have come from (exact, by enumeration). Corrupted user and item
attributes do not lower the ceiling, because the ids identify the clean values. The Bayes AUC
reported is the AUC of `p_bayes`; `oracle_auc` is the AUC of `p_true`.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from model.synth import write  # one writer for every generated data set

log = logging.getLogger(__name__)

DEVICES = np.array(["ios", "android", "web", "tv"], dtype=object)
DEVICE_P = np.array([0.35, 0.4, 0.2, 0.05])
GENDERS = np.array(["f", "m", "u"], dtype=object)
STRUCTURES = ("latent", "context", "nonlinear")

USER_COLUMNS = ["user_id", "user_gender", "user_age", "user_income", "user_region"]
ITEM_COLUMNS = ["item_id", "item_category", "item_brand", "item_price"]
CONTEXT_COLUMNS = ["hour", "weekday", "device"]


@dataclass(frozen=True)
class FamilyConfig:
    """Sizes and the strength of each structure (0 switches it off).

    The base effects (user and item biases, attribute main effects, gender x category,
    context main effects) are always on; they are what a per-field model can learn.
    """

    name: str = "synthetic-mixed"
    seed: int = 7
    rows: int = 300_000
    users: int = 10_000
    items: int = 3_000
    categories: int = 30
    regions: int = 30
    brands: int = 400
    zipf_users: float = 1.0
    zipf_items: float = 1.05
    label_rate: float = 0.15
    id_scale: float = 1.0  # spread of per-id effects beyond their attributes
    latent: float = 0.0
    latent_dim: int = 8
    context: float = 0.0
    nonlinear: float = 0.0
    noise: float = 0.0  # share of logged context values and of user/item attributes corrupted
    valid_frac: float = 0.15
    test_frac: float = 0.15
    fmt: str = "parquet"

    def __post_init__(self) -> None:
        if self.rows < 100:
            raise ValueError("rows must be >= 100")
        if not 0 <= self.noise < 1:
            raise ValueError("noise must lie in [0, 1)")
        if not 0 < self.label_rate < 1:
            raise ValueError("label_rate must lie in (0, 1)")
        if self.fmt not in ("parquet", "csv"):
            raise ValueError(f"unknown format '{self.fmt}' (parquet or csv)")


# One preset per structure, and one with all of them. Sizes are for the default 300k rows and
# stay fixed at 1M, which then has 3.3x the impressions per id.
FAMILY: dict[str, dict] = {
    "synthetic-latent": {"latent": 1.0},
    "synthetic-context": {"context": 1.0},
    "synthetic-nonlinear": {"nonlinear": 1.0},
    "synthetic-noisy": {"latent": 0.6, "context": 0.8, "nonlinear": 0.4, "noise": 0.25},
    "synthetic-longtail": {"users": 100_000, "items": 50_000, "zipf_users": 0.9, "zipf_items": 1.0, "id_scale": 1.6,
                           "latent": 0.5, "context": 0.5},
    "synthetic-mixed": {"latent": 0.8, "context": 0.8, "nonlinear": 0.8, "noise": 0.1, "zipf_items": 1.1},
}  # fmt: skip


def preset(name: str, **overrides) -> FamilyConfig:
    """The named member's config; `overrides` (rows, seed, ...) replace single settings."""
    if name not in FAMILY:
        raise ValueError(f"unknown synthetic family member '{name}' (choose from {', '.join(sorted(FAMILY))})")
    return replace(FamilyConfig(name=name, **FAMILY[name]), **overrides)


def _zipf_weights(n: int, a: float, rng: np.random.Generator) -> np.ndarray:
    w = 1.0 / np.arange(1, n + 1) ** a
    return rng.permutation(w / w.sum())


def _ids(prefix: str, n: int) -> np.ndarray:
    width = len(str(n - 1))
    return np.array([f"{prefix}{i:0{width}d}" for i in range(n)], dtype=object)


def _labels(prefix: str, idx: np.ndarray) -> np.ndarray:
    names = np.array([f"{prefix}{k}" for k in range(int(idx.max()) + 1)], dtype=object)
    return names[idx]


def _z(x: np.ndarray) -> np.ndarray:
    return (x - x.mean()) / (x.std() + 1e-12)


def _corrupt(values: np.ndarray, share: float, draw, rng: np.random.Generator) -> np.ndarray:
    """Replace a random `share` of values by fresh draws (which may equal the clean value)."""
    hit = rng.random(len(values)) < share
    out = values.copy()
    out[hit] = draw(int(hit.sum()))
    return out


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _solve_bias(logit: np.ndarray, rate: float) -> float:
    """Bisection for the intercept that gives the requested mean click probability."""
    lo, hi = -30.0, 30.0
    for _ in range(50):
        mid = (lo + hi) / 2
        if np.mean(_sigmoid(logit + mid)) < rate:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def _posterior(obs: np.ndarray, prior: np.ndarray, share: float) -> np.ndarray:
    """P(clean = k | logged = obs) [n, K] when a `share` of values is replaced uniformly."""
    k = len(prior)
    like = np.full((len(obs), k), share / k)
    like[np.arange(len(obs)), obs] += 1.0 - share
    post = like * prior
    return post / post.sum(axis=1, keepdims=True)


def generate(cfg: FamilyConfig) -> dict[str, pd.DataFrame | dict]:
    """Build every table in memory; `write` puts them on disk. Deterministic for `cfg.seed`."""
    rng = np.random.default_rng(cfg.seed)
    n, nu, ni, nc = cfg.rows, cfg.users, cfg.items, cfg.categories
    d = cfg.latent_dim

    # ---- entities (clean attributes)
    user_w = _zipf_weights(nu, cfg.zipf_users, rng)
    item_w = _zipf_weights(ni, cfg.zipf_items, rng)
    gender = rng.choice(3, nu, p=[0.48, 0.48, 0.04])
    age = rng.integers(18, 76, nu)
    income = np.round(rng.lognormal(10.5, 0.5, nu), -2)
    region = rng.integers(0, cfg.regions, nu)
    category = rng.integers(0, nc, ni)
    brand = rng.integers(0, cfg.brands, ni)
    # Prices sit around each category's level, so price is partly but not wholly a category fact.
    price = np.round(np.exp(rng.normal(3.0, 0.6, nc)[category] + rng.normal(0, 0.7, ni)), 2)
    age_z = (age - 46.5) / 16.7
    income_z = _z(np.log(income))
    price_z = _z(np.log(price))

    # ---- base effects (always on)
    user_bias = rng.normal(0, 0.25, cfg.regions)[region] + rng.normal(0, 0.35 * cfg.id_scale, nu)
    pop = _z(np.log(item_w))
    item_bias = (
        rng.normal(0, 0.3, nc)[category]
        + rng.normal(0, 0.3, cfg.brands)[brand]
        + 0.15 * pop  # popular items are clicked a little more often, as in real logs
        + rng.normal(0, 0.45 * cfg.id_scale, ni)
    )
    gender_cat = rng.normal(0, 0.3, (3, nc))
    hour_eff = 0.25 * np.sin(2 * np.pi * (np.arange(24) - 8) / 24)
    weekday_eff = rng.normal(0, 0.1, 7)
    device_eff = rng.normal(0, 0.2, 4)
    age_slope, price_slope = 0.15, -0.2

    # ---- structure parameters
    s = d**-0.25  # entries of both factors: their dot product has unit variance
    region_lat = rng.normal(0, s, (cfg.regions, d))
    user_lat = np.sqrt(0.3) * region_lat[region] + np.sqrt(0.7) * rng.normal(0, s, (nu, d))
    cat_lat = rng.normal(0, s, (nc, d))
    dc = 4
    t = 2 * np.pi * np.arange(24) / 24
    hour_lat = (np.outer(np.cos(t), rng.normal(0, dc**-0.25, dc)) + np.outer(np.sin(t), rng.normal(0, dc**-0.25, dc)))
    item_ctx = np.sqrt(0.5) * rng.normal(0, dc**-0.25, (nc, dc))[category] + np.sqrt(0.5) * rng.normal(0, dc**-0.25, (ni, dc))
    device_cat = rng.normal(0, 0.5, (4, nc))
    weekday_cat = rng.normal(0, 0.3, (7, nc))
    age_phase = rng.uniform(0, 2 * np.pi, nc)

    # ---- impressions (clean context)
    u = rng.choice(nu, n, p=user_w)
    i = rng.choice(ni, n, p=item_w)
    hour_p = np.exp(0.6 * np.sin(2 * np.pi * (np.arange(24) - 14) / 24))  # evening peak, quiet nights
    hour_p /= hour_p.sum()
    hour = rng.choice(24, n, p=hour_p)
    weekday = rng.integers(0, 7, n)
    device = rng.choice(4, n, p=DEVICE_P)
    ci = category[i]

    terms = {
        "base": user_bias[u] + item_bias[i] + gender_cat[gender[u], ci] + weekday_eff[weekday]
        + age_slope * age_z[u] + price_slope * price_z[i],
        "latent": cfg.latent * np.einsum("nd,nd->n", user_lat[u], cat_lat[ci]),
        "context_weekday": cfg.context * weekday_cat[weekday, ci],
        "nonlinear": cfg.nonlinear * (0.5 * (1.0 - (price_z[i] - income_z[u]) ** 2 / 2.0)
                                      + 0.8 * np.sin(2.2 * age_z[u] + age_phase[ci])),
    }  # fmt: skip
    # The hour and device parts are kept as [n, K] tables over every possible value, so the
    # posterior under corrupted context can be enumerated exactly.
    hour_tab = hour_eff[None, :] + cfg.context * (item_ctx[i] @ hour_lat.T)  # [n, 24]
    device_tab = device_eff[None, :] + cfg.context * device_cat[:, ci].T  # [n, 4]
    rest = sum(terms.values())
    rows_idx = np.arange(n)
    logit = rest + hour_tab[rows_idx, hour] + device_tab[rows_idx, device]
    bias = _solve_bias(logit, cfg.label_rate)
    p_true = _sigmoid(logit + bias)
    label = (rng.random(n) < p_true).astype(np.int64)

    # ---- what the log records: corrupted values where noise is on
    r = cfg.noise
    hour_obs, device_obs = hour, device
    age_obs, income_obs, category_obs = age, income, category
    if r > 0:
        hour_obs = _corrupt(hour, r, lambda k: rng.integers(0, 24, k), rng)
        device_obs = _corrupt(device, r, lambda k: rng.integers(0, 4, k), rng)
        age_obs = _corrupt(age, r, lambda k: rng.integers(18, 76, k), rng)
        income_obs = _corrupt(income, r, lambda k: np.round(rng.lognormal(10.5, 0.5, k), -2), rng)
        category_obs = _corrupt(category, r, lambda k: rng.integers(0, nc, k), rng)
        p_bayes = _bayes_given_logged(rest + bias, hour_tab, device_tab, hour_obs, device_obs, hour_p, DEVICE_P, r)
    else:
        p_bayes = p_true

    user_ids, item_ids = _ids("u", nu), _ids("i", ni)
    users = pd.DataFrame(
        {
            "user_id": user_ids,
            "user_gender": GENDERS[gender],
            "user_age": age_obs.astype(np.int64),
            "user_income": income_obs.astype(np.float64),
            "user_region": _labels("r", region),
        }
    )
    items = pd.DataFrame(
        {
            "item_id": item_ids,
            "item_category": _labels("c", category_obs),
            "item_brand": _labels("b", brand),
            "item_price": price,
        }
    )
    rows = pd.DataFrame({"label": label, "p_true": p_true, "p_bayes": p_bayes})
    for col in USER_COLUMNS:
        rows[col] = users[col].to_numpy()[u]
    for col in ITEM_COLUMNS:
        rows[col] = items[col].to_numpy()[i]
    rows["hour"] = hour_obs.astype(np.int64)
    rows["weekday"] = weekday.astype(np.int64)
    rows["device"] = DEVICES[device_obs]

    order = rng.permutation(n)
    n_test, n_valid = int(n * cfg.test_frac), int(n * cfg.valid_frac)
    # Each split keeps generation order, so its rows line up with the logits indexed below.
    parts = {"test": np.sort(order[:n_test]), "valid": np.sort(order[n_test : n_test + n_valid]),
             "train": np.sort(order[n_test + n_valid :])}  # fmt: skip
    splits = {k: rows.iloc[v].reset_index(drop=True) for k, v in parts.items()}
    # Structure terms on the test rows, for each structure's share of the Bayes AUC.
    test = parts["test"]
    full = logit[test]
    structure_terms = {
        "latent": terms["latent"][test],
        "context": terms["context_weekday"][test] + cfg.context * (
            (item_ctx[i[test]] * hour_lat[hour[test]]).sum(axis=1) + device_cat[device[test], ci[test]]
        ),
        "nonlinear": terms["nonlinear"][test],
    }  # fmt: skip
    meta = _meta(cfg, splits, full, structure_terms, u, i, parts)
    return {**splits, "users": users, "items": items, "meta": meta}


def _bayes_given_logged(
    rest: np.ndarray,
    hour_tab: np.ndarray,
    device_tab: np.ndarray,
    hour_obs: np.ndarray,
    device_obs: np.ndarray,
    hour_p: np.ndarray,
    device_p: np.ndarray,
    share: float,
    chunk: int = 65_536,
) -> np.ndarray:
    """E[p_true | logged hour and device], summed over all 24 x 4 clean values in row chunks."""
    out = np.empty(len(rest))
    for a in range(0, len(rest), chunk):
        b = min(a + chunk, len(rest))
        ph = _posterior(hour_obs[a:b], hour_p, share)  # [m, 24]
        pd_ = _posterior(device_obs[a:b], device_p, share)  # [m, 4]
        z = rest[a:b, None, None] + hour_tab[a:b, :, None] + device_tab[a:b, None, :]  # [m, 24, 4]
        out[a:b] = np.einsum("mh,md,mhd->m", ph, pd_, _sigmoid(z))
    return out


def _meta(cfg: FamilyConfig, splits: dict[str, pd.DataFrame], test_logit: np.ndarray, structure_terms: dict,
          u: np.ndarray, i: np.ndarray, parts: dict[str, np.ndarray]) -> dict:  # fmt: skip
    from model.metrics import auc as _auc
    from model.metrics import logloss

    y_test = splits["test"]["label"].to_numpy()
    drop = {}
    for name in STRUCTURES:
        if getattr(cfg, name) > 0:
            drop[name] = _auc(y_test, test_logit) - _auc(y_test, test_logit - structure_terms[name])
    train_counts_u = np.bincount(u[parts["train"]], minlength=cfg.users)
    train_counts_i = np.bincount(i[parts["train"]], minlength=cfg.items)
    return {
        "name": cfg.name,
        "config": asdict(cfg),
        "rows": {k: len(v) for k, v in splits.items()},
        "label_rate": {k: float(v["label"].mean()) for k, v in splits.items()},
        "bayes_auc": {k: _auc(v["label"].to_numpy(), v["p_bayes"].to_numpy()) for k, v in splits.items()},
        "bayes_logloss": {k: logloss(v["label"].to_numpy(), v["p_bayes"].to_numpy()) for k, v in splits.items()},
        "oracle_auc": {k: _auc(v["label"].to_numpy(), v["p_true"].to_numpy()) for k, v in splits.items()},
        # How much of the test oracle AUC each structure carries: the AUC lost when its term is
        # removed from the clean logit.
        "structure_auc_drop": drop,
        "tail": {
            "test_rows_user_seen_lt5_in_train": float(np.mean(train_counts_u[u[parts["test"]]] < 5)),
            "test_rows_item_seen_lt5_in_train": float(np.mean(train_counts_i[i[parts["test"]]] < 5)),
            "users_in_train": int(np.count_nonzero(train_counts_u)),
            "items_in_train": int(np.count_nonzero(train_counts_i)),
        },
    }


def synthesize(cfg: FamilyConfig, out_dir: str | Path) -> dict:
    tables = generate(cfg)
    write(tables, out_dir, cfg.fmt)
    meta = tables["meta"]
    assert isinstance(meta, dict)
    log.info("synth_family_written name=%s out=%s rows=%d label_rate=%.4f bayes_auc_test=%.4f",
             cfg.name, out_dir, cfg.rows, meta["label_rate"]["train"], meta["bayes_auc"]["test"])  # fmt: skip
    return meta
