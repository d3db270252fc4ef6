"""The structured synthetic family: each member generates, is seeded, has a real ceiling above a
linear model's reach, carries its structure, and trains end to end."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pytest

from model.spec import OOV_ID, FeatureSpec
from model.synth_family import CONTEXT_COLUMNS, FAMILY, ITEM_COLUMNS, STRUCTURES, USER_COLUMNS, generate, preset

ROWS = 20_000
FIELDS = USER_COLUMNS + ITEM_COLUMNS + CONTEXT_COLUMNS


@pytest.fixture(scope="module")
def members() -> dict[str, dict]:
    return {name: generate(preset(name, rows=ROWS, seed=5)) for name in FAMILY}


def _logistic_test_auc(t: dict) -> float:
    """A plain logistic regression on one-hot fields (numerics in 10 quantile bins)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import KBinsDiscretizer, OneHotEncoder
    from sklearn.compose import ColumnTransformer

    numeric = ["user_age", "user_income", "item_price"]
    cats = [c for c in FIELDS if c not in numeric]
    model = make_pipeline(
        ColumnTransformer([
            ("cat", OneHotEncoder(handle_unknown="ignore", min_frequency=2), cats),
            ("num", KBinsDiscretizer(n_bins=10, encode="onehot", quantile_method="averaged_inverted_cdf"), numeric),
        ]),
        LogisticRegression(C=0.5, max_iter=300),
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Bins whose width are too small")  # rounded incomes tie
        model.fit(t["train"][FIELDS], t["train"]["label"])
    return float(roc_auc_score(t["test"]["label"], model.predict_proba(t["test"][FIELDS])[:, 1]))


def test_cli_names_every_member():
    from model.cli import FAMILY_NAMES

    assert sorted(FAMILY_NAMES) == sorted(FAMILY)


@pytest.mark.parametrize("name", sorted(FAMILY))
def test_member_tables_rates_and_bayes_ceiling(members, name):
    t = members[name]
    meta = t["meta"]
    assert meta["name"] == name and meta["rows"] == {"test": 3000, "valid": 3000, "train": 14000}
    for split in ("train", "valid", "test"):
        df = t[split]
        assert list(df.columns) == ["label", "p_true", "p_bayes", *FIELDS]
        assert df["p_true"].between(0, 1).all() and df["p_bayes"].between(0, 1).all()
    rows = pd.concat([t["train"], t["valid"], t["test"]])
    assert abs(rows["p_true"].mean() - 0.15) < 0.005 and abs(rows["label"].mean() - 0.15) < 0.015
    bayes = meta["bayes_auc"]["test"]
    assert 0.5 < bayes < 1 and meta["oracle_auc"]["test"] >= bayes
    # The ceiling is above what a linear model on the logged fields reaches.
    assert _logistic_test_auc(t) < bayes - 0.02, (name, bayes)


@pytest.mark.parametrize("name", sorted(FAMILY))
def test_member_is_reproducible_by_seed(members, name):
    again, other = generate(preset(name, rows=ROWS, seed=5)), generate(preset(name, rows=ROWS, seed=6))
    for part in ("train", "valid", "test", "users", "items"):
        pd.testing.assert_frame_equal(members[name][part], again[part])
    assert again["meta"] == members[name]["meta"]
    assert not other["train"]["label"].equals(again["train"]["label"])


@pytest.mark.parametrize("name", sorted(FAMILY))
def test_spec_fits_and_encodes_and_tables_feed_the_store(members, name):
    t = members[name]
    spec = FeatureSpec.load(name).fit(t["train"])
    assert spec.raw_columns == FIELDS and spec.group == "user_id"
    sizes = np.array(spec.vocab_sizes)
    for split in ("train", "test"):
        tokens = spec.encode(t[split])
        assert (tokens >= OOV_ID).all() and (tokens < sizes).all()
    users, items = t["users"], t["items"]
    assert users["user_id"].is_unique and items["item_id"].is_unique
    assert spec.fields_from("user") == USER_COLUMNS and spec.fields_from("item") == ITEM_COLUMNS
    # The rows join the tables: a user's logged attributes are the users table's.
    joined = t["test"][USER_COLUMNS].merge(users, on="user_id", suffixes=("", "_table"))
    assert (joined["user_age"] == joined["user_age_table"]).all()


@pytest.mark.parametrize("name", ["synthetic-latent", "synthetic-context", "synthetic-nonlinear"])
def test_single_structure_members_carry_their_structure(members, name):
    structure = name.removeprefix("synthetic-")
    drop = members[name]["meta"]["structure_auc_drop"]
    assert set(drop) == {structure}
    assert drop[structure] > 0.02  # removing it costs the oracle at least 0.02 AUC


def test_mixed_member_has_every_structure(members):
    assert set(members["synthetic-mixed"]["meta"]["structure_auc_drop"]) == set(STRUCTURES)


def test_longtail_ids_are_mostly_rare():
    # 100k rows: at 20k even the default sizes leave most ids rare.
    tail = generate(preset("synthetic-longtail", rows=100_000))["meta"]["tail"]
    base = generate(preset("synthetic-latent", rows=100_000))["meta"]["tail"]
    assert tail["test_rows_item_seen_lt5_in_train"] > 3 * base["test_rows_item_seen_lt5_in_train"]
    assert tail["test_rows_user_seen_lt5_in_train"] > 1.5 * base["test_rows_user_seen_lt5_in_train"]
    assert tail["items_in_train"] > 3 * base["items_in_train"]


def test_noisy_context_lowers_the_ceiling_and_p_bayes_is_calibrated():
    """With corrupted context the best achievable probability is E[p_true | logged values]:
    below the clean oracle in AUC, and calibrated against the labels within its own bins."""
    t = generate(preset("synthetic-noisy", rows=80_000, seed=9))
    meta = t["meta"]
    assert meta["oracle_auc"]["test"] > meta["bayes_auc"]["test"] + 0.005
    rows = pd.concat([t["train"], t["valid"], t["test"]])
    assert not np.allclose(rows["p_true"], rows["p_bayes"])
    assert abs(rows["p_bayes"].mean() - rows["p_true"].mean()) < 0.003
    bins = pd.qcut(rows["p_bayes"], 10, labels=False)
    by_bin = rows.groupby(bins)[["label", "p_bayes"]].mean()
    assert np.abs(by_bin["label"] - by_bin["p_bayes"]).max() < 0.015
    # Within one logged hour, p_bayes is flatter than p_true: the logged value is less informative.
    assert rows["p_bayes"].std() < rows["p_true"].std()


def test_noise_off_means_p_bayes_is_p_true(members):
    for name in ("synthetic-latent", "synthetic-context", "synthetic-nonlinear", "synthetic-longtail"):
        df = members[name]["test"]
        np.testing.assert_array_equal(df["p_true"], df["p_bayes"])


def test_unknown_member_and_bad_settings_are_refused():
    with pytest.raises(ValueError, match="unknown synthetic family member 'synthetic-nope'"):
        preset("synthetic-nope")
    with pytest.raises(ValueError, match="noise"):
        preset("synthetic-noisy", noise=1.5)


@pytest.mark.slow
def test_cli_generates_a_member_and_a_one_epoch_train_runs(tmp_path, capsys):
    from ctr.cli import main

    data = tmp_path / "latent"
    assert main(["data", "synth", "--family", "synthetic-latent", "--rows", "30000", "--seed", "3", "--out", str(data)]) == 0
    printed = json.loads(capsys.readouterr().out)
    meta = json.loads((data / "meta.json").read_text())
    assert printed["bayes_auc"] == meta["bayes_auc"] and meta["config"]["rows"] == 30_000
    assert {p.name for p in data.iterdir()} == {f"{n}.parquet" for n in ("train", "valid", "test", "users", "items")} | {"meta.json"}
    run = tmp_path / "run"
    argv = ["train", "--spec", "synthetic-latent", "--data", str(data), "--model", "dnn", "--out", str(run),
            "--epochs", "1", "--batch-size", "512", "--hidden", "64,64", "--threads", "1", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0.6 < metrics["test"]["auc"] < meta["bayes_auc"]["test"] + 0.01, metrics["test"]
