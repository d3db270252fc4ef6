"""FeatureSpec: fit, encode, serialise and refuse bad input with the field's name."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from model.spec import MASK_ID, NUM_RESERVED, OOV_ID, PAD_ID, FeatureSpec, FieldSpec, SpecError, shipped_specs


def _spec(**overrides) -> FeatureSpec:
    fields = [
        FieldSpec("user", "user", "categorical", min_count=2),
        FieldSpec("price", "item", "numeric", bucketing="quantile", num_buckets=4),
        FieldSpec("clicks", "user", "numeric", bucketing="log2"),
        FieldSpec("city", "context", "categorical"),
        FieldSpec("user_x_city", "cross", "cross", inputs=["user", "city"], num_buckets=64),
    ]
    return FeatureSpec(name="t", fields=fields, label="label", group="user", hash_seed=5, **overrides)


@pytest.fixture()
def train() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "label": [0, 1, 0, 1, 0, 1],
            "user": ["a", "a", "b", "b", "c", "a"],
            "price": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
            "clicks": [0, 1, 3, 9, 100, 2],
            "city": [10, 10, 20, 30, 20, 10],
        }
    )


def test_reserved_ids_are_distinct_and_first():
    assert (PAD_ID, OOV_ID, MASK_ID) == (0, 1, 2)
    assert NUM_RESERVED == 3


def test_fit_applies_min_count_and_frequency_order(train):
    fitted = _spec().fit(train)
    user = fitted.field("user")
    assert user.vocab == ["a", "b"]  # "c" seen once, below min_count=2
    tokens = fitted.encode(train)
    assert tokens.dtype == np.int64 and tokens.shape == (6, 5)
    assert list(tokens[:, 0]) == [3, 3, 4, 4, OOV_ID, 3]


def test_unseen_and_missing_values_become_oov(train):
    fitted = _spec().fit(train)
    rows = [{"user": "zzz", "price": None, "clicks": float("nan"), "city": 99}]
    tokens = fitted.encode(rows)
    assert list(tokens[0, :4]) == [OOV_ID] * 4


def test_numeric_quantile_and_log2_buckets(train):
    fitted = _spec().fit(train)
    price = fitted.field("price")
    assert len(price.boundaries) == 3 and price.boundaries == sorted(price.boundaries)
    tokens = fitted.encode(pd.DataFrame({"user": ["a"] * 3, "price": [-1e9, 3.5, 1e9], "clicks": [0, 5, 1e6], "city": [10] * 3}))
    assert tokens[0, 1] == NUM_RESERVED and tokens[2, 1] == NUM_RESERVED + len(price.boundaries)
    clicks = fitted.field("clicks")
    assert clicks.boundaries[:4] == [0.0, 1.0, 2.0, 4.0]
    # 5 lies in [4, 8): bucket index 4 after boundaries 0,1,2,4
    assert tokens[1, 2] == NUM_RESERVED + 4
    assert tokens[2, 2] == NUM_RESERVED + len(clicks.boundaries)  # above the fitted max: last bucket


def test_cross_is_deterministic_within_range_and_depends_on_seed(train):
    fitted = _spec().fit(train)
    a = fitted.encode(train)[:, 4]
    assert np.all((a >= NUM_RESERVED) & (a < NUM_RESERVED + 64))
    assert np.array_equal(a, fitted.encode(train)[:, 4])
    other = FeatureSpec.from_dict({**fitted.to_dict(), "hash_seed": 6})
    assert not np.array_equal(a, other.encode(train)[:, 4])
    # the same (user, city) pair hashes to the same bucket on every row
    assert a[0] == a[1]


def test_equivalent_raw_forms_encode_identically(train):
    fitted = _spec().fit(train)
    as_ints = fitted.encode({"user": ["a"], "price": [2], "clicks": [3], "city": [10]})
    as_strs = fitted.encode({"user": ["a"], "price": ["2"], "clicks": ["3"], "city": ["10"]})
    as_floats = fitted.encode({"user": ["a"], "price": [2.0], "clicks": [3.0], "city": [10.0]})
    assert np.array_equal(as_ints, as_strs) and np.array_equal(as_ints, as_floats)


def test_all_table_types_agree(train):
    fitted = _spec().fit(train)
    ref = fitted.encode(train)
    assert np.array_equal(ref, fitted.encode(train.to_dict("records")))
    assert np.array_equal(ref, fitted.encode({c: train[c].tolist() for c in train.columns}))
    assert np.array_equal(ref, fitted.encode(pa.Table.from_pandas(train)))


def test_json_round_trip_keeps_encoding(train, tmp_path):
    fitted = _spec().fit(train)
    path = tmp_path / "spec.json"
    fitted.save(path)
    loaded = FeatureSpec.load(path)
    assert loaded.to_dict() == fitted.to_dict()
    assert np.array_equal(loaded.encode(train), fitted.encode(train))
    assert json.loads(path.read_text())["format_version"] == 1


def test_empty_input_gives_empty_tokens(train):
    fitted = _spec().fit(train)
    assert fitted.encode([]).shape == (0, 5)
    assert fitted.encode(train.iloc[:0]).shape == (0, 5)
    # rows with no known columns still count as rows (all OOV) in serving mode
    assert fitted.encode([{}, {}], strict=False).shape == (2, 5)


def test_service_mode_fills_absent_columns_with_oov(train):
    fitted = _spec().fit(train)
    with pytest.raises(SpecError, match="no column 'city'"):
        fitted.encode({"user": ["a"], "price": [1.0], "clicks": [1]})
    tokens = fitted.encode({"user": ["a"], "price": [1.0], "clicks": [1]}, strict=False)
    assert tokens[0, 3] == OOV_ID


def test_wrong_dtypes_name_the_field(train):
    fitted = _spec().fit(train)
    with pytest.raises(SpecError, match="field 'price': expected numeric"):
        fitted.encode({"user": ["a"], "price": ["cheap"], "clicks": [1], "city": [10]})
    with pytest.raises(SpecError, match="field 'user': expected scalar"):
        fitted.encode([{"user": ["a", "b"], "price": 1.0, "clicks": 1, "city": 10}])
    with pytest.raises(SpecError, match="different lengths"):
        fitted.encode({"user": ["a", "b"], "price": [1.0], "clicks": [1], "city": [10]})
    with pytest.raises(SpecError, match="cannot encode"):
        fitted.encode(42)


def test_unfitted_spec_refuses_to_encode(train):
    with pytest.raises(SpecError, match="not fitted"):
        _spec().encode(train)


@pytest.mark.parametrize(
    "fields, message",
    [
        ([FieldSpec("a", "user", "categorical"), FieldSpec("a", "item", "categorical")], "duplicate"),
        ([FieldSpec("a", "user", "categorical"), FieldSpec("x", "cross", "cross", inputs=["a", "zz"])], "unknown field 'zz'"),
        ([FieldSpec("label", "user", "categorical")], "label column"),
    ],
)
def test_invalid_declarations_are_refused(fields, message):
    with pytest.raises(SpecError, match=message):
        FeatureSpec(name="bad", fields=fields)


def test_bad_field_kind_and_source():
    with pytest.raises(SpecError, match="unknown kind"):
        FieldSpec("a", "user", "text")  # type: ignore[arg-type]
    with pytest.raises(SpecError, match="unknown source"):
        FieldSpec("a", "shop", "categorical")  # type: ignore[arg-type]
    with pytest.raises(SpecError, match="two or more inputs"):
        FieldSpec("x", "cross", "cross", inputs=["a"])


def test_malformed_json_and_future_versions_are_refused():
    with pytest.raises(SpecError, match="not valid JSON"):
        FeatureSpec.from_json("{nope")
    with pytest.raises(SpecError, match="format_version 99"):
        FeatureSpec.from_dict({"format_version": 99, "fields": []})
    with pytest.raises(SpecError, match="malformed"):
        FeatureSpec.from_dict({"format_version": 1, "fields": [{"nme": "x"}]})


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.update(lable="click"), "spec has unknown key(s) ['lable']"),
        (lambda d: d["fields"][1].update(num_bucket=4), "field 'user_gender' has unknown key(s) ['num_bucket']"),
        (lambda d: d["fields"].append({"nme": "x", "source": "user", "kind": "categorical"}), "fields[12] has unknown key(s) ['nme']"),
    ],
)
def test_a_misspelt_spec_key_is_named_with_the_valid_ones(edit, message):
    """Why: a misspelt top-level key used to be dropped without a word, and a misspelt field key
    surfaced as a raw TypeError from the dataclass; both now name the key and list the valid ones."""
    data = json.loads((Path(__file__).resolve().parents[1] / "model" / "specs" / "synthetic.json").read_text())
    FeatureSpec.from_dict(data)  # the shipped file itself is fine
    edit(data)
    with pytest.raises(SpecError) as exc:
        FeatureSpec.from_dict(data)
    assert message in str(exc.value) and "valid keys:" in str(exc.value)
    valid = "num_buckets" if "field" in message else "label"
    assert valid in str(exc.value).split("valid keys:")[1]


def test_every_shipped_spec_passes_the_key_check():
    for name in shipped_specs():
        assert FeatureSpec.load(name).fields


def test_shipped_specs_load_and_fit_real_samples(frappe_dir):
    from model.readers import read_table

    samples = frappe_dir.parent / "samples"
    criteo = read_table(samples / "criteo_sample.txt")
    fitted = FeatureSpec.load("criteo_sample").fit(criteo)
    tokens = fitted.encode(criteo)
    assert tokens.shape == (len(criteo), fitted.num_fields)
    assert (tokens == OOV_ID).any()  # empty Criteo cells are missing values
    assert np.all(tokens < np.array(fitted.vocab_sizes))

    frappe = read_table(frappe_dir / "valid.csv").iloc[:2000]
    f = FeatureSpec.load("frappe_x1").fit(frappe)
    assert f.num_fields == 10 and f.group == "user"
    assert np.all(f.encode(frappe) >= NUM_RESERVED)


def test_synthetic_spec_matches_generated_tables(synth_dir, synth_spec):
    import pandas as pd

    users = pd.read_parquet(synth_dir / "users.parquet")
    items = pd.read_parquet(synth_dir / "items.parquet")
    assert set(synth_spec.fields_from("user")) <= set(users.columns)
    assert set(synth_spec.fields_from("item")) <= set(items.columns)
    assert synth_spec.fields_from("context") == ["device", "hour"]
