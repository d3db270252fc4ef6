"""Combination statistics: built in one streaming pass, merged across shards, stored safely.

Order 1 is counted exactly (one bincount over every field's vocabulary: the spec says how many
values each field has). Orders 2 and 3 have too many possible values for exact tables, so each
gets a count-min sketch plus a heavy-hitter summary (`testtime.sketch`): the hierarchical
probabilistic hashing of MATT (docs/test-time.md).

The file is an `.npz` of plain arrays (loaded with allow_pickle=False) with its JSON header
stored as a uint8 array, and a JSON manifest next to it with the archive's sha256, so a
damaged file is refused before numpy reads it.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from model.logs import kv
from model.spec import FeatureSpec
from testtime.combos import OrderLayout, default_fields, make_layout
from testtime.sketch import CountMinSketch, HeavyHitters, chunk_counts

log = logging.getLogger(__name__)

STATS_FILE = "test_time_stats.npz"
MANIFEST_FILE = "test_time_stats.json"
FORMAT = "ctr-serve/test-time-stats"
FORMAT_VERSION = 1


class StatsError(ValueError):
    """A statistics file that must not be used; the message says why."""


@dataclass
class StatsConfig:
    """Sizes and the counted field subsets (defaults in docs/test-time.md)."""

    orders: tuple[int, ...] = (1, 2, 3)
    depth: int = 4
    width_log2: int = 20
    heavy_capacity: int = 65536
    pair_fields: list[str] | None = None  # None: the pair_top_k largest non-cross fields
    pair_top_k: int | None = 5  # None: every non-cross field
    triple_fields: list[str] | None = None  # None: the triple_top_k largest non-cross fields
    triple_top_k: int | None = 4
    seed: int = 20261202
    chunk_rows: int = 131072  # per counting step: larger amortises the per-step table pass

    def __post_init__(self) -> None:
        self.orders = tuple(sorted(set(int(o) for o in self.orders)))
        if not self.orders or not set(self.orders) <= {1, 2, 3} or 1 not in self.orders:
            raise ValueError(f"orders must include 1 and be a subset of 1, 2, 3; got {list(self.orders)}")
        if not 1 <= self.width_log2 <= 30:
            raise ValueError(f"width_log2 must be in 1..30, got {self.width_log2}")


def layouts_for(spec: FeatureSpec, cfg: StatsConfig) -> dict[int, OrderLayout]:
    out: dict[int, OrderLayout] = {1: make_layout(spec, 1, spec.field_names)}
    if 2 in cfg.orders:
        out[2] = make_layout(spec, 2, cfg.pair_fields or default_fields(spec, 2, cfg.pair_top_k))
    if 3 in cfg.orders:
        out[3] = make_layout(spec, 3, cfg.triple_fields or default_fields(spec, 3, cfg.triple_top_k))
    for o, lay in out.items():
        if o > 1 and lay.size == 0:
            raise ValueError(f"order {o}: the field subset has fewer than {o} fields")
    return out


@dataclass
class ComboStats:
    """Counts for one spec: exact order-1 counts, a sketch and heavy hitters per higher order."""

    spec_fields: list[str]
    vocab_sizes: list[int]
    config: StatsConfig
    layouts: dict[int, OrderLayout]
    singles: np.ndarray  # int64 [sum(vocab_sizes)]
    sketches: dict[int, CountMinSketch] = field(default_factory=dict)
    heavy: dict[int, HeavyHitters] = field(default_factory=dict)
    rows: int = 0
    positives: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.vocab_sizes)[:-1]]).astype(np.int64)

    @property
    def positive_rate(self) -> float:
        return self.positives / self.rows if self.rows else float("nan")

    # ------------------------------------------------------------------ merge
    def merge(self, other: "ComboStats") -> "ComboStats":
        """Shards of one log, counted separately, combine into the statistics of the whole."""
        if self.spec_fields != other.spec_fields or self.vocab_sizes != other.vocab_sizes:
            raise StatsError("statistics from different specs do not merge")
        if asdict(self.config) | {"chunk_rows": 0} != asdict(other.config) | {"chunk_rows": 0}:
            raise StatsError("statistics built with different settings do not merge")
        sketches = {o: s.merge(other.sketches[o]) for o, s in self.sketches.items()}
        return ComboStats(
            list(self.spec_fields), list(self.vocab_sizes), self.config, self.layouts, self.singles + other.singles,
            sketches,
            {o: h.merge(other.heavy[o], sketches[o]) for o, h in self.heavy.items()},
            self.rows + other.rows, self.positives + other.positives,
        )

    # ------------------------------------------------------------------ io
    def header(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "field_names": self.spec_fields,
            "vocab_sizes": self.vocab_sizes,
            "config": asdict(self.config) | {"orders": list(self.config.orders)},
            "combos": {str(o): lay.combos.tolist() for o, lay in self.layouts.items()},
            "rows": self.rows,
            "positives": self.positives,
            "heavy_floor": {str(o): h.floor for o, h in self.heavy.items()},
            **self.extra,
        }

    def to_bytes(self) -> bytes:
        arrays: dict[str, np.ndarray] = {
            "header": np.frombuffer(json.dumps(self.header(), sort_keys=True).encode(), dtype=np.uint8),
            "singles": self.singles,
        }
        for o, s in self.sketches.items():
            arrays[f"cms{o}"] = s.table
            arrays[f"cms{o}_a"] = s.a
            arrays[f"cms{o}_b"] = s.b
        for o, h in self.heavy.items():
            arrays[f"heavy{o}_keys"] = h.keys
            arrays[f"heavy{o}_lower"] = h.lower
            arrays[f"heavy{o}_upper"] = h.upper
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, spec: FeatureSpec | None = None) -> "ComboStats":
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            header = json.loads(arrays["header"].tobytes().decode())
        except (ValueError, KeyError, OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise StatsError(f"statistics file does not load: {type(exc).__name__}: {exc}") from exc
        if header.get("format") != FORMAT or header.get("format_version") != FORMAT_VERSION:
            raise StatsError(f"not a supported statistics file (format {header.get('format')} v{header.get('format_version')})")
        if spec is not None and (header["field_names"] != spec.field_names or header["vocab_sizes"] != spec.vocab_sizes):
            raise StatsError("statistics were built for another spec (fields or vocabularies differ)")
        cfg_d = dict(header["config"])
        cfg_d["orders"] = tuple(cfg_d["orders"])
        cfg = StatsConfig(**cfg_d)
        layouts = _layouts_from_header(header, spec)
        sketches = {o: CountMinSketch(arrays[f"cms{o}"].astype(np.int64), arrays[f"cms{o}_a"], arrays[f"cms{o}_b"])
                    for o in cfg.orders if o > 1}
        heavy = {}
        for o in cfg.orders:
            if o > 1:
                h = HeavyHitters(cfg.heavy_capacity, arrays[f"heavy{o}_keys"], arrays[f"heavy{o}_lower"], arrays[f"heavy{o}_upper"],
                                 int(header["heavy_floor"][str(o)]))
                heavy[o] = h
        known = {"format", "format_version", "field_names", "vocab_sizes", "config", "combos", "rows", "positives", "heavy_floor"}
        return cls(list(header["field_names"]), list(header["vocab_sizes"]), cfg, layouts, arrays["singles"].astype(np.int64),
                   sketches, heavy, int(header["rows"]), int(header["positives"]),
                   {k: v for k, v in header.items() if k not in known})

    def save(self, path: str | Path, **manifest_extra: Any) -> dict[str, Any]:
        """Write `path` (npz) and its manifest next to it, each by an atomic rename."""
        p = Path(path)
        data = self.to_bytes()
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "file": p.name,
            "sha256": hashlib.sha256(data).hexdigest(),
            "bytes": len(data),
            "rows": self.rows,
            "orders": list(self.config.orders),
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
            **manifest_extra,
        }
        _atomic_write(p, data)
        _atomic_write(p.with_name(manifest_name(p.name)), (json.dumps(manifest, indent=1) + "\n").encode())
        return manifest

    @classmethod
    def load(cls, path: str | Path, spec: FeatureSpec | None = None) -> "ComboStats":
        p = Path(path)
        data = p.read_bytes()
        check_manifest(p, data)
        return cls.from_bytes(data, spec)


def manifest_name(stats_name: str) -> str:
    return MANIFEST_FILE if stats_name == STATS_FILE else f"{Path(stats_name).stem}.json"


def check_manifest(path: Path, data: bytes | None = None) -> dict[str, Any]:
    """The sha256 and size in the manifest must match the file (raises StatsError)."""
    mpath = path.with_name(manifest_name(path.name))
    if not mpath.is_file():
        raise StatsError(f"{path.name} has no manifest {mpath.name}")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StatsError(f"{mpath.name} is not valid JSON: {exc}") from exc
    data = path.read_bytes() if data is None else data
    if manifest.get("bytes") != len(data) or manifest.get("sha256") != hashlib.sha256(data).hexdigest():
        raise StatsError(f"{path.name} does not match the sha256 in {mpath.name}: the file is damaged or was replaced")
    return manifest


def _layouts_from_header(header: dict[str, Any], spec: FeatureSpec | None) -> dict[int, OrderLayout]:
    """Rebuild each layout and check it reproduces the stored combination list exactly."""
    src: Any = spec if spec is not None else _SizesOnly(header["field_names"], header["vocab_sizes"])
    return _exact_combos(src, header)


def _exact_combos(spec: Any, header: dict[str, Any]) -> dict[int, OrderLayout]:
    """Rebuild each layout and check it reproduces the stored combination list exactly."""
    out = {}
    names = header["field_names"]
    for o, combos in header["combos"].items():
        o = int(o)
        fields = [names[i] for i in sorted({i for c in combos for i in c})] if o > 1 else names
        lay = make_layout(spec, o, fields)
        if lay.combos.tolist() != combos:
            raise StatsError(f"order {o}: stored combinations do not match their field subset")
        out[o] = lay
    return out


class _SizesOnly:
    """What `make_layout` reads from a spec: field names and vocabulary sizes."""

    def __init__(self, names: list[str], sizes: list[int]) -> None:
        self.field_names = list(names)
        self.vocab_sizes = list(sizes)


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------- build
class StatsBuilder:
    """Feed encoded token chunks (`add`), then `finish`. Memory is the sketches, not the log."""

    def __init__(self, spec: FeatureSpec, config: StatsConfig | None = None) -> None:
        self.spec = spec
        self.config = config or StatsConfig()
        self.layouts = layouts_for(spec, self.config)
        self.vocab_sizes = list(spec.vocab_sizes)
        self.offsets = np.concatenate([[0], np.cumsum(self.vocab_sizes)[:-1]]).astype(np.int64)
        self.singles = np.zeros(int(sum(self.vocab_sizes)), dtype=np.int64)
        w = 1 << self.config.width_log2
        self.sketches = {o: CountMinSketch.empty(self.config.depth, w, self.config.seed + o) for o in self.layouts if o > 1}
        self.heavy = {o: HeavyHitters.empty(self.config.heavy_capacity) for o in self.layouts if o > 1}
        self.rows = 0
        self.positives = 0

    def add(self, tokens: np.ndarray, labels: np.ndarray | None = None) -> None:
        tokens = np.asarray(tokens, dtype=np.int64)
        if tokens.ndim != 2 or tokens.shape[1] != len(self.vocab_sizes):
            raise ValueError(f"tokens must be [rows, {len(self.vocab_sizes)}], got {list(tokens.shape)}")
        step = self.config.chunk_rows
        for start in range(0, len(tokens), step):
            self._add_chunk(tokens[start : start + step])
        self.rows += len(tokens)
        if labels is not None:
            self.positives += int(np.asarray(labels).sum())

    def _add_chunk(self, tokens: np.ndarray) -> None:
        self.singles += np.bincount((tokens + self.offsets).reshape(-1), minlength=self.singles.size)
        columns = np.ascontiguousarray(tokens.T)
        for o, cms in self.sketches.items():
            keys = self.layouts[o].keys_t(columns).reshape(-1)
            cells = cms.cells(keys)
            cms.add_cells(cells)
            # Heavy hitters: the chunk's exact counts of the keys that can still enter, ranked
            # by their count-min estimates. Once the summary is full, one hash row (itself an
            # upper bound) screens out the keys below its threshold before the sort.
            hh = self.heavy[o]
            thr = hh.threshold
            if thr > 0:
                first = cms.table[0][cells[0]]
                keep = first >= thr
                if not keep.all():
                    hh.note_dropped(int(first[~keep].max()))
                    keys = keys[keep]
            uniq, counts = chunk_counts(keys)
            hh.offer(uniq, counts, cms.estimate)

    def finish(self, **extra: Any) -> ComboStats:
        for o, hh in self.heavy.items():
            hh.finalize(self.sketches[o])
        return ComboStats(list(self.spec.field_names), self.vocab_sizes, self.config, self.layouts, self.singles.copy(),
                          dict(self.sketches), dict(self.heavy), self.rows, self.positives, dict(extra))


def iter_token_chunks(spec: FeatureSpec, path: str | Path, chunk_rows: int) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """Encoded (tokens, labels) chunk by chunk from a Parquet or CSV/TSV file, never the whole file."""
    import pandas as pd

    from model.readers import _looks_tab_separated, iter_parquet_batches

    p = Path(path)
    if p.suffix == ".parquet":
        frames: Iterable[Any] = iter_parquet_batches(p, chunk_rows)
    else:
        sep = "\t" if p.suffix in (".tsv", ".txt") and _looks_tab_separated(p) else ","
        frames = pd.read_csv(p, sep=sep, chunksize=chunk_rows, low_memory=False)
    for frame in frames:
        labels = frame[spec.label].to_numpy() if spec.label in frame.columns else None
        yield spec.encode(frame), labels


def build_from_file(spec: FeatureSpec, path: str | Path, config: StatsConfig | None = None,
                    read_rows: int = 262144) -> ComboStats:
    import time

    builder = StatsBuilder(spec, config)
    t0 = time.perf_counter()
    count_s = 0.0
    for tokens, labels in iter_token_chunks(spec, path, read_rows):
        t1 = time.perf_counter()
        builder.add(tokens, labels)
        count_s += time.perf_counter() - t1
    total_s = time.perf_counter() - t0
    log.info("stats_built %s", kv(path=str(path), rows=builder.rows, count_seconds=round(count_s, 2),
                                   total_seconds=round(total_s, 2)))
    return builder.finish(source={"file": Path(path).name, "count_seconds": round(count_s, 3),
                                  "total_seconds": round(total_s, 3)})
