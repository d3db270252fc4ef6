"""Table readers for CSV and Parquet, with the train/valid/test split convention.

A data directory holds one file per split (`train.csv`, `valid.parquet`, ...). Parquet files
can also be streamed in row batches, so a training job can walk data larger than memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

SPLITS = ("train", "valid", "test")
SUFFIXES = (".parquet", ".csv", ".txt", ".tsv")


class DataError(FileNotFoundError):
    """A data directory or file is missing or unreadable; the message says which."""


def read_table(path: str | Path, columns: list[str] | None = None) -> pd.DataFrame:
    """Read one CSV/TSV/Parquet file. Categorical ids stay as read; the spec normalises them."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"no such data file: {p}")
    if p.suffix == ".parquet":
        return pq.read_table(p, columns=columns).to_pandas()
    sep = "\t" if p.suffix in (".tsv", ".txt") and _looks_tab_separated(p) else ","
    return pd.read_csv(p, sep=sep, usecols=columns, low_memory=False)


def split_path(data_dir: str | Path, split: str) -> Path:
    d = Path(data_dir)
    if not d.is_dir():
        raise DataError(f"data directory not found: {d}")
    for suffix in SUFFIXES:
        p = d / f"{split}{suffix}"
        if p.exists():
            return p
    raise DataError(f"no '{split}' split in {d} (looked for {', '.join(split + s for s in SUFFIXES)})")


def load_splits(data_dir: str | Path, splits: tuple[str, ...] = SPLITS) -> dict[str, pd.DataFrame]:
    return {s: read_table(split_path(data_dir, s)) for s in splits}


def iter_parquet_batches(path: str | Path, batch_rows: int, columns: list[str] | None = None) -> Iterator[pd.DataFrame]:
    """Stream a Parquet file in row batches without loading it whole."""
    pf = pq.ParquetFile(Path(path))
    for batch in pf.iter_batches(batch_size=batch_rows, columns=columns):
        yield batch.to_pandas()


def _looks_tab_separated(p: Path) -> bool:
    with p.open("r", encoding="utf-8", errors="replace") as fh:
        head = fh.readline()
    return head.count("\t") > head.count(",")


def data_fingerprint(data_dir: str | Path, splits: tuple[str, ...] = SPLITS) -> dict | None:
    """Content hash of a data directory's split files, recorded by training and carried into
    the model package so a served model can be traced to the exact data it learned from."""
    import hashlib
    import json

    files: dict[str, Path] = {}
    for split in splits:
        try:
            files[split] = split_path(data_dir, split)
        except DataError:
            continue
    if not files:
        return None
    digests = {}
    for split, path in files.items():
        h = hashlib.sha256()
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        digests[split] = h.hexdigest()
    combined = hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest()
    return {"sha256": combined, "files": {s: {"name": p.name, "sha256": digests[s]} for s, p in files.items()}}
