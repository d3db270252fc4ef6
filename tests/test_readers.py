"""Readers: CSV/Parquet/TSV, split discovery, streaming, and clear errors."""

from __future__ import annotations

import pandas as pd
import pytest

from model.readers import DataError, iter_parquet_batches, load_splits, read_table, split_path


@pytest.fixture()
def table() -> pd.DataFrame:
    return pd.DataFrame({"label": [0, 1, 1, 0, 1], "user": ["a", "b", "a", "c", "b"], "x": [1.5, 2.0, None, 4.0, 5.0]})


def test_csv_and_parquet_read_the_same_table(tmp_path, table):
    table.to_csv(tmp_path / "train.csv", index=False)
    table.to_parquet(tmp_path / "valid.parquet", index=False)
    a, b = read_table(tmp_path / "train.csv"), read_table(tmp_path / "valid.parquet")
    pd.testing.assert_frame_equal(a, b, check_dtype=False)


def test_tab_separated_text_is_detected(tmp_path, table):
    table.to_csv(tmp_path / "test.txt", sep="\t", index=False)
    assert list(read_table(tmp_path / "test.txt").columns) == ["label", "user", "x"]


def test_split_discovery_prefers_parquet(tmp_path, table):
    table.to_csv(tmp_path / "train.csv", index=False)
    table.to_parquet(tmp_path / "train.parquet", index=False)
    assert split_path(tmp_path, "train").suffix == ".parquet"


def test_missing_split_and_directory_are_clear_errors(tmp_path, table):
    table.to_csv(tmp_path / "train.csv", index=False)
    with pytest.raises(DataError, match="no 'valid' split"):
        load_splits(tmp_path)
    with pytest.raises(DataError, match="data directory not found"):
        split_path(tmp_path / "nope", "train")
    with pytest.raises(DataError, match="no such data file"):
        read_table(tmp_path / "absent.csv")


def test_parquet_streams_in_row_batches(tmp_path):
    big = pd.DataFrame({"label": range(1000), "user": [f"u{i % 7}" for i in range(1000)]})
    big.to_parquet(tmp_path / "train.parquet", index=False, row_group_size=100)
    batches = list(iter_parquet_batches(tmp_path / "train.parquet", batch_rows=256))
    assert sum(len(b) for b in batches) == 1000
    assert max(len(b) for b in batches) <= 256
    assert list(pd.concat(batches)["label"]) == list(range(1000))


def test_frappe_splits_have_documented_shape(frappe_dir):
    splits = load_splits(frappe_dir, ("valid", "test"))
    assert len(splits["valid"]) == 57_722 and len(splits["test"]) == 28_860
    assert list(splits["test"].columns)[0] == "label"
