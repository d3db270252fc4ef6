"""Synthetic CTR data with a known answer.

Users and items follow Zipf-like popularity and carry categorical and numeric side features.
Clicks come from a hidden logistic model with real user x item interactions (a segment x
category table and low-rank user/item latent factors), so a model that only learns per-field
marginals falls measurably short. The true click probability is written next to every label,
which lets tests and benchmarks compare a model's AUC with the Bayes-optimal AUC.

The generator also writes the user and item feature tables that the service loads into Redis
or the embedded store, so the quickstart serves exactly the entities it trained on.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

DEVICES = np.array(["ios", "android", "web", "tv"])
GENDERS = np.array(["f", "m", "u"])


@dataclass(frozen=True)
class SynthConfig:
    """Sizes and the strength of each hidden effect; defaults give a ~15% click rate."""

    seed: int = 7
    rows: int = 200_000
    users: int = 5_000
    items: int = 2_000
    segments: int = 16
    categories: int = 24
    brands: int = 300
    latent_dim: int = 4
    zipf_users: float = 1.05
    zipf_items: float = 1.1
    label_rate: float = 0.15
    interaction_scale: float = 1.0
    valid_frac: float = 0.15
    test_frac: float = 0.15
    fmt: str = "parquet"


def _zipf_weights(n: int, a: float, rng: np.random.Generator) -> np.ndarray:
    w = 1.0 / np.arange(1, n + 1) ** a
    return rng.permutation(w / w.sum())


def _ids(prefix: str, n: int) -> np.ndarray:
    width = len(str(n - 1))
    return np.array([f"{prefix}{i:0{width}d}" for i in range(n)], dtype=object)


def generate(cfg: SynthConfig) -> dict[str, pd.DataFrame | dict]:
    """Build every table in memory; `write` puts them on disk. Deterministic for `cfg.seed`."""
    rng = np.random.default_rng(cfg.seed)

    user_w = _zipf_weights(cfg.users, cfg.zipf_users, rng)
    item_w = _zipf_weights(cfg.items, cfg.zipf_items, rng)
    users = pd.DataFrame(
        {
            "user_id": _ids("u", cfg.users),
            "user_gender": rng.choice(GENDERS, cfg.users, p=[0.48, 0.48, 0.04]),
            "user_age": rng.integers(18, 71, cfg.users),
            "user_segment": np.char.add("s", rng.integers(0, cfg.segments, cfg.users).astype(str)).astype(object),
            # Heavy users are the popular ones: activity tracks Zipf weight with noise.
            "user_activity": np.round(user_w * cfg.rows * rng.lognormal(0, 0.5, cfg.users)).astype(np.int64),
        }
    )
    items = pd.DataFrame(
        {
            "item_id": _ids("i", cfg.items),
            "item_category": np.char.add("c", rng.integers(0, cfg.categories, cfg.items).astype(str)).astype(object),
            "item_brand": np.char.add("b", rng.integers(0, cfg.brands, cfg.items).astype(str)).astype(object),
            "item_price": np.round(rng.lognormal(3.0, 1.0, cfg.items), 2),
        }
    )

    # Hidden model parameters.
    seg_idx = users["user_segment"].str[1:].astype(int).to_numpy()
    cat_idx = items["item_category"].str[1:].astype(int).to_numpy()
    seg_cat = rng.normal(0, 1.0, (cfg.segments, cfg.categories)) * cfg.interaction_scale
    hour_cat = rng.normal(0, 0.35, (24, cfg.categories))
    device_eff = rng.normal(0, 0.25, len(DEVICES))
    user_bias = rng.normal(0, 0.3, cfg.users)
    item_bias = rng.normal(0, 0.5, cfg.items)
    user_lat = rng.normal(0, 0.6, (cfg.users, cfg.latent_dim)) * cfg.interaction_scale
    item_lat = rng.normal(0, 0.6, (cfg.items, cfg.latent_dim)) * cfg.interaction_scale
    price_sens = rng.normal(0.4, 0.3, cfg.segments)
    price_z = (np.log(items["item_price"].to_numpy()) - 3.0) / 1.0
    age_z = (users["user_age"].to_numpy() - 44) / 15.0
    age_cat = rng.normal(0, 0.4, cfg.categories)

    # Impressions.
    u = rng.choice(cfg.users, cfg.rows, p=user_w)
    i = rng.choice(cfg.items, cfg.rows, p=item_w)
    device = rng.choice(len(DEVICES), cfg.rows, p=[0.35, 0.4, 0.2, 0.05])
    hour = rng.integers(0, 24, cfg.rows)

    logit = (
        user_bias[u]
        + item_bias[i]
        + seg_cat[seg_idx[u], cat_idx[i]]
        + np.einsum("nd,nd->n", user_lat[u], item_lat[i])
        + hour_cat[hour, cat_idx[i]]
        + device_eff[device]
        - price_sens[seg_idx[u]] * price_z[i]
        + age_z[u] * age_cat[cat_idx[i]]
    )
    bias = _solve_bias(logit, cfg.label_rate)
    p_true = 1.0 / (1.0 + np.exp(-(logit + bias)))
    label = (rng.random(cfg.rows) < p_true).astype(np.int64)

    rows = pd.DataFrame(
        {
            "label": label,
            "p_true": p_true,
            "user_id": users["user_id"].to_numpy()[u],
            "item_id": items["item_id"].to_numpy()[i],
            "device": DEVICES[device],
            "hour": hour,
        }
    )
    rows = rows.merge(users, on="user_id", how="left").merge(items, on="item_id", how="left")

    order = rng.permutation(cfg.rows)
    n_test = int(cfg.rows * cfg.test_frac)
    n_valid = int(cfg.rows * cfg.valid_frac)
    splits = {
        "test": rows.iloc[order[:n_test]].reset_index(drop=True),
        "valid": rows.iloc[order[n_test : n_test + n_valid]].reset_index(drop=True),
        "train": rows.iloc[order[n_test + n_valid :]].reset_index(drop=True),
    }
    meta = {
        "config": asdict(cfg),
        "label_rate": {k: float(v["label"].mean()) for k, v in splits.items()},
        "bayes_auc": {k: bayes_auc(v) for k, v in splits.items()},
        "bayes_logloss": {k: bayes_logloss(v) for k, v in splits.items()},
    }
    return {**splits, "users": users, "items": items, "meta": meta}


def bayes_auc(df: pd.DataFrame) -> float:
    """AUC of the true probabilities: no model can beat it in expectation."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(df["label"], df["p_true"]))


def bayes_logloss(df: pd.DataFrame) -> float:
    from sklearn.metrics import log_loss

    return float(log_loss(df["label"], df["p_true"], labels=[0, 1]))


def _solve_bias(logit: np.ndarray, rate: float) -> float:
    """Bisection for the intercept that gives the requested mean click probability."""
    lo, hi = -30.0, 30.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if np.mean(1.0 / (1.0 + np.exp(-(logit + mid)))) < rate:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def write(tables: dict[str, pd.DataFrame | dict], out_dir: str | Path, fmt: str = "parquet") -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, table in tables.items():
        if name == "meta":
            continue
        assert isinstance(table, pd.DataFrame)
        if fmt == "parquet":
            table.to_parquet(out / f"{name}.parquet", index=False)
        elif fmt == "csv":
            table.to_csv(out / f"{name}.csv", index=False)
        else:
            raise ValueError(f"unknown format '{fmt}' (parquet or csv)")
    (out / "meta.json").write_text(json.dumps(tables["meta"], indent=2))
    return out


def synthesize(cfg: SynthConfig, out_dir: str | Path) -> dict:
    tables = generate(cfg)
    write(tables, out_dir, cfg.fmt)
    meta = tables["meta"]
    assert isinstance(meta, dict)
    log.info(
        "synth_written out=%s rows=%d label_rate=%.4f bayes_auc_test=%.4f",
        out_dir,
        cfg.rows,
        meta["label_rate"]["train"],
        meta["bayes_auc"]["test"],
    )
    return meta
