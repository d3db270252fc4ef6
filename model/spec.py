"""The FeatureSpec: the one contract between offline training and online serving.

A spec declares every field once (name, source, kind and bucketing) and, after `fit`,
carries its vocabularies and bucket boundaries. Training writes the fitted spec into the
run directory and the model package, and the service reads it from there, so no field list,
bucket boundary or hash seed is ever written twice.

This module must stay free of torch: the serving image imports it without torch installed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

FORMAT_VERSION = 1

# Reserved ids at the start of every field's vocabulary. PAD fills padded batch rows, OOV
# takes unseen categories and missing values, MASK is the diffusion model's absorbing state.
PAD_ID = 0
OOV_ID = 1
MASK_ID = 2
NUM_RESERVED = 3

Source = Literal["user", "item", "context", "cross"]
Kind = Literal["categorical", "numeric", "cross"]
Bucketing = Literal["quantile", "log2"]

# 64-bit mixing constants (splitmix64); crosses hash token ids, not strings, so the hash
# is a handful of vectorised integer operations and identical everywhere numpy runs.
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


class SpecError(ValueError):
    """A spec or an input table does not fit the contract; the message names the field."""


@dataclass
class FieldSpec:
    """One input field. `vocab` / `boundaries` are empty until the spec is fitted."""

    name: str
    source: Source
    kind: Kind
    min_count: int = 1
    bucketing: Bucketing = "quantile"
    num_buckets: int = 16
    inputs: list[str] = field(default_factory=list)
    vocab: list[str] = field(default_factory=list)
    boundaries: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.source not in ("user", "item", "context", "cross"):
            raise SpecError(f"field '{self.name}': unknown source '{self.source}'")
        if self.kind not in ("categorical", "numeric", "cross"):
            raise SpecError(f"field '{self.name}': unknown kind '{self.kind}'")
        if self.kind == "cross":
            if len(self.inputs) < 2:
                raise SpecError(f"cross field '{self.name}' needs two or more inputs")
            if self.num_buckets < 1:
                raise SpecError(f"cross field '{self.name}' needs num_buckets >= 1")
        if self.kind == "numeric" and self.bucketing not in ("quantile", "log2"):
            raise SpecError(f"field '{self.name}': unknown bucketing '{self.bucketing}'")
        if self.min_count < 1:
            raise SpecError(f"field '{self.name}': min_count must be >= 1")

    @property
    def vocab_size(self) -> int:
        """Embedding rows this field needs, reserved ids included."""
        if self.kind == "categorical":
            return NUM_RESERVED + len(self.vocab)
        if self.kind == "numeric":
            return NUM_RESERVED + len(self.boundaries) + 1
        return NUM_RESERVED + self.num_buckets


@dataclass
class FeatureSpec:
    """Declared fields plus their fitted state; see the module docstring for why it exists."""

    name: str
    fields: list[FieldSpec]
    label: str = "label"
    group: str | None = None
    hash_seed: int = 0
    fitted: bool = False
    format_version: int = FORMAT_VERSION
    _indexes: dict[str, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        names = [f.name for f in self.fields]
        if not names:
            raise SpecError("a spec needs at least one field")
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise SpecError(f"duplicate field names: {dupes}")
        if self.label in names:
            raise SpecError(f"label column '{self.label}' is also declared as a field")
        position = {n: i for i, n in enumerate(names)}
        for f in self.fields:
            for inp in f.inputs:
                if inp not in position:
                    raise SpecError(f"cross field '{f.name}' uses unknown field '{inp}'")
                if position[inp] >= position[f.name] or self.fields[position[inp]].kind == "cross":
                    raise SpecError(
                        f"cross field '{f.name}': input '{inp}' must be a non-cross field declared before it"
                    )

    # ------------------------------------------------------------------ shape
    @property
    def field_names(self) -> list[str]:
        return [f.name for f in self.fields]

    @property
    def num_fields(self) -> int:
        return len(self.fields)

    @property
    def vocab_sizes(self) -> list[int]:
        self._require_fitted()
        return [f.vocab_size for f in self.fields]

    @property
    def raw_columns(self) -> list[str]:
        """Columns an input table must provide (crosses are derived, not read)."""
        return [f.name for f in self.fields if f.kind != "cross"]

    def fields_from(self, source: str) -> list[str]:
        return [f.name for f in self.fields if f.source == source and f.kind != "cross"]

    def field(self, name: str) -> FieldSpec:
        for f in self.fields:
            if f.name == name:
                return f
        raise SpecError(f"no field named '{name}'")

    # ------------------------------------------------------------------ fit
    def fit(self, table: Any) -> "FeatureSpec":
        """Return a fitted copy: vocabularies and boundaries come from this (training) table."""
        columns = _as_columns(table)
        fitted_fields: list[FieldSpec] = []
        for f in self.fields:
            if f.kind == "cross":
                fitted_fields.append(replace(f))
                continue
            col = _column(columns, f.name, strict=True)
            if f.kind == "categorical":
                values, missing = _to_str(col, f.name)
                counts = pd.Series(values[~missing]).value_counts(sort=False)
                kept = counts[counts >= f.min_count]
                # Frequency order, then lexical, so ids are stable for a given table.
                order = sorted(kept.items(), key=lambda kv: (-kv[1], kv[0]))
                fitted_fields.append(replace(f, vocab=[k for k, _ in order]))
            else:
                nums = _to_float(col, f.name)
                fitted_fields.append(replace(f, boundaries=_fit_boundaries(nums[~np.isnan(nums)], f)))
        return FeatureSpec(
            name=self.name,
            fields=fitted_fields,
            label=self.label,
            group=self.group,
            hash_seed=self.hash_seed,
            fitted=True,
        )

    # ------------------------------------------------------------------ encode
    def encode(self, table: Any, *, strict: bool = True) -> np.ndarray:
        """Encode a table into int64 tokens [rows, num_fields], vectorised per column.

        `strict=True` (training) refuses a table that lacks a declared column; the service
        passes `strict=False` so a column nobody supplied becomes OOV for every row.
        """
        self._require_fitted()
        if isinstance(table, (list, tuple)) and len(table) == 0:
            return np.empty((0, self.num_fields), dtype=np.int64)
        columns = _as_columns(table)
        n = len(table) if isinstance(table, (list, tuple)) else _num_rows(columns)
        out = np.empty((n, self.num_fields), dtype=np.int64)
        for j, f in enumerate(self.fields):
            if f.kind == "cross":
                idx = [self.field_names.index(i) for i in f.inputs]
                out[:, j] = self.hash_cross(out[:, idx], f)
                continue
            col = _column(columns, f.name, strict=strict)
            if col is None:
                out[:, j] = OOV_ID
            elif f.kind == "categorical":
                out[:, j] = self._encode_categorical(col, f)
            else:
                out[:, j] = self._encode_numeric(col, f)
        return out

    def _encode_categorical(self, col: Any, f: FieldSpec) -> np.ndarray:
        arr = _object_array(col)
        if arr.dtype.kind == "O" and len(arr) and pd.api.types.infer_dtype(arr, skipna=False) == "integer":
            arr = arr.astype(np.int64)  # JSON numbers arrive as Python ints
        if arr.dtype.kind in "iu":
            # Integer ids (Frappe, most logs) skip the string round trip entirely.
            keys, positions = self._int_lookup(f)
            found = keys.get_indexer(arr)
            ids = np.where(found < 0, OOV_ID, positions[found] + NUM_RESERVED)
            return ids.astype(np.int64, copy=False)
        values, missing = _to_str(arr, f.name)
        lookup = self._indexes.get(f.name)
        if lookup is None:
            lookup = _StringLookup(f.vocab)
            self._indexes[f.name] = lookup
        ids = lookup(values)
        ids = np.where((ids < 0) | missing, OOV_ID, ids + NUM_RESERVED)
        return ids.astype(np.int64, copy=False)

    def _int_lookup(self, f: FieldSpec) -> tuple[pd.Index, np.ndarray]:
        """Vocabulary entries that are canonical integers, keyed by their int value."""
        key = f"{f.name}#int"
        cached = self._indexes.get(key)
        if cached is None:
            pairs = [(int(v), i) for i, v in enumerate(f.vocab) if _is_canonical_int(v)]
            keys = pd.Index([k for k, _ in pairs], dtype=np.int64)
            positions = np.array([i for _, i in pairs] + [0], dtype=np.int64)
            cached = (keys, positions)
            self._indexes[key] = cached  # type: ignore[assignment]
        return cached  # type: ignore[return-value]

    def _encode_numeric(self, col: Any, f: FieldSpec) -> np.ndarray:
        nums = _to_float(col, f.name)
        ids = np.searchsorted(np.asarray(f.boundaries, dtype=np.float64), nums, side="right")
        ids = ids.astype(np.int64) + NUM_RESERVED
        ids[np.isnan(nums)] = OOV_ID
        return ids

    def hash_cross(self, parts: np.ndarray, f: FieldSpec) -> np.ndarray:
        """Cross bucket ids from the input fields' token ids [rows, len(f.inputs)].

        Public so the service's per-item token cache hashes crosses with this one formula.
        """
        h = np.full(parts.shape[0], np.uint64(self.hash_seed) ^ _GOLDEN, dtype=np.uint64)
        with np.errstate(over="ignore"):
            for k in range(parts.shape[1]):
                h = _splitmix(h ^ (parts[:, k].astype(np.uint64) + np.uint64(k + 1) * _GOLDEN))
        return (h % np.uint64(f.num_buckets)).astype(np.int64) + NUM_RESERVED

    def _require_fitted(self) -> None:
        if not self.fitted:
            raise SpecError(f"spec '{self.name}' is not fitted: call fit() on training data first")

    # ------------------------------------------------------------------ serialise
    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "name": self.name,
            "label": self.label,
            "group": self.group,
            "hash_seed": self.hash_seed,
            "fitted": self.fitted,
            "fields": [_field_dict(f, self.fitted) for f in self.fields],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, ensure_ascii=False)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json(), encoding="utf-8")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "FeatureSpec":
        if not isinstance(data, Mapping):
            raise SpecError("a spec must be a JSON object")
        version = data.get("format_version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise SpecError(f"spec format_version {version} is not supported (expected {FORMAT_VERSION})")
        _refuse_unknown(data, _SPEC_KEYS, "spec")
        if not isinstance(data.get("fields"), list):
            raise SpecError("malformed spec: 'fields' must be a list of field objects")
        for i, fd in enumerate(data["fields"]):
            if not isinstance(fd, Mapping):
                raise SpecError(f"malformed spec: fields[{i}] must be an object, got {fd!r}")
            _refuse_unknown(fd, _FIELD_KEYS, f"field '{fd['name']}'" if "name" in fd else f"fields[{i}]")
        try:
            fields = [FieldSpec(**fd) for fd in data["fields"]]
            return cls(
                name=data.get("name", "spec"),
                fields=fields,
                label=data.get("label", "label"),
                group=data.get("group"),
                hash_seed=int(data.get("hash_seed", 0)),
                fitted=bool(data.get("fitted", False)),
            )
        except (KeyError, TypeError) as exc:
            raise SpecError(f"malformed spec: {exc}") from exc

    @classmethod
    def from_json(cls, text: str) -> "FeatureSpec":
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as exc:
            raise SpecError(f"spec is not valid JSON: {exc}") from exc

    @classmethod
    def load(cls, path: str | Path) -> "FeatureSpec":
        """Load a spec file, or a spec shipped with the package by bare name (e.g. `frappe_x1`)."""
        p = Path(path)
        if not p.exists():
            shipped = Path(__file__).parent / "specs" / f"{path}.json"
            if shipped.exists():
                p = shipped
            else:
                raise SpecError(f"spec '{path}' not found (neither a file nor a shipped spec)")
        return cls.from_json(p.read_text(encoding="utf-8"))


# ---------------------------------------------------------------------- helpers
# The keys a spec file may hold (`to_dict` writes no others): a misspelt one would otherwise be
# dropped (top level) or fail as a raw TypeError (a field), far from the file that caused it.
_SPEC_KEYS = ("format_version", "name", "label", "group", "hash_seed", "fitted", "fields")
_FIELD_KEYS = tuple(f for f in FieldSpec.__dataclass_fields__)


def _refuse_unknown(data: Mapping[str, Any], valid: Sequence[str], where: str) -> None:
    unknown = [k for k in data if k not in valid]
    if unknown:
        raise SpecError(f"malformed spec: {where} has unknown key(s) {unknown} (valid keys: {', '.join(valid)})")


def shipped_specs() -> list[str]:
    return sorted(p.stem for p in (Path(__file__).parent / "specs").glob("*.json"))


def _field_dict(f: FieldSpec, fitted: bool) -> dict[str, Any]:
    d = asdict(f)
    if f.kind != "categorical":
        d.pop("vocab")
        d.pop("min_count")
    if f.kind != "numeric":
        d.pop("boundaries")
        d.pop("bucketing")
    if f.kind == "categorical":
        d.pop("num_buckets")
    if f.kind != "cross":
        d.pop("inputs")
    if not fitted:
        d.pop("vocab", None)
        d.pop("boundaries", None)
    return d


class _StringLookup:
    """Vectorised string -> vocabulary position (-1 when absent).

    pandas' C hash table is ~30x faster than `Index.get_indexer` on a 100-row request (no
    Index is built around the target) and ~4x faster on a 100k-row split. It is internal to
    pandas, so the public `Index.get_indexer` stands in if it ever moves.
    """

    def __init__(self, vocab: list[str]) -> None:
        keys = np.array(vocab, dtype=object)
        try:
            from pandas._libs.hashtable import PyObjectHashTable

            table = PyObjectHashTable(max(len(keys), 1))
            table.map_locations(keys)
            self._fn = lambda values: np.asarray(table.lookup(values), dtype=np.int64)
        except (ImportError, AttributeError):  # pragma: no cover - depends on the pandas build
            index = pd.Index(keys, dtype=object)
            self._fn = lambda values: index.get_indexer(pd.Index(values, dtype=object, copy=False))

    def __call__(self, values: np.ndarray) -> np.ndarray:
        return self._fn(values.astype(object, copy=False))


def _is_canonical_int(v: str) -> bool:
    try:
        return str(int(v)) == v
    except ValueError:
        return False


def _splitmix(x: np.ndarray) -> np.ndarray:
    x = (x ^ (x >> np.uint64(30))) * _MIX1
    x = (x ^ (x >> np.uint64(27))) * _MIX2
    return x ^ (x >> np.uint64(31))


def _fit_boundaries(values: np.ndarray, f: FieldSpec) -> list[float]:
    if values.size == 0:
        return []
    if f.bucketing == "log2":
        top = float(np.max(values))
        edges = [0.0] + [float(2**k) for k in range(0, 63) if 2**k <= max(top, 1.0)]
        return sorted(set(edges))
    qs = np.quantile(values, np.linspace(0, 1, f.num_buckets + 1)[1:-1])
    return [float(q) for q in np.unique(qs)]


def _as_columns(table: Any) -> Mapping[str, Any]:
    """Accept a DataFrame, a pyarrow Table, a dict of columns or a list of row dicts."""
    if isinstance(table, pd.DataFrame):
        return table
    if hasattr(table, "column_names") and hasattr(table, "column"):  # pyarrow.Table
        return {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}
    if isinstance(table, Mapping):
        return table
    if isinstance(table, Sequence) and not isinstance(table, (str, bytes)):
        if len(table) == 0:
            return {}
        if not all(isinstance(r, Mapping) for r in table):
            raise SpecError("a list input must hold one dict per row")
        keys: dict[str, None] = {}
        for r in table:
            keys.update(dict.fromkeys(r))
        return {k: [r.get(k) for r in table] for k in keys}
    raise SpecError(f"cannot encode a {type(table).__name__}: pass a DataFrame, a dict of columns or a list of dicts")


def _num_rows(columns: Mapping[str, Any]) -> int:
    if isinstance(columns, pd.DataFrame):
        return len(columns)
    lengths = {len(v) for v in columns.values()}
    if len(lengths) > 1:
        raise SpecError(f"columns have different lengths: {sorted(lengths)}")
    return lengths.pop() if lengths else 0


def _column(columns: Mapping[str, Any], name: str, *, strict: bool) -> Any:
    if name in columns:
        return columns[name]
    if strict:
        raise SpecError(f"input has no column '{name}'")
    return None


def _to_str(col: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Normalise a column to strings so 77, '77' and 77.0 (from a CSV with gaps) agree.

    Works on plain numpy arrays and dispatches on pandas' C-level type inference: building a
    pandas Series per field costs more than the whole lookup for a 100-row request, and the
    common cases (all strings, all integers) never run Python per element.
    """
    arr = _object_array(col)
    if arr.dtype.kind in "iub":
        return arr.astype(str).astype(object), np.zeros(len(arr), dtype=bool)
    if arr.dtype.kind == "f":
        missing = np.isnan(arr)
        finite = arr[~missing]
        if finite.size and np.all(np.mod(finite, 1) == 0):
            out = np.where(missing, 0, arr).astype(np.int64).astype(str).astype(object)
        else:
            out = arr.astype(str).astype(object)
        return out, missing
    inferred = pd.api.types.infer_dtype(arr, skipna=True)
    if inferred in ("string", "empty"):
        missing = pd.isna(arr) | (arr == "")
        return arr, missing
    if inferred == "integer":
        missing = pd.isna(arr)
        return (arr.astype(str).astype(object) if not missing.any() else _slow_str(arr, name)), missing
    out = _slow_str(arr, name)
    return out, out == ""


def _object_array(col: Any) -> np.ndarray:
    if isinstance(col, pd.Series):
        if col.dtype.kind in "iubf":
            return col.to_numpy()
        if isinstance(col.dtype, pd.api.extensions.ExtensionDtype) and col.dtype.kind in "iu":
            return col.to_numpy(dtype=object, na_value=None)
        return col.to_numpy(dtype=object)
    if isinstance(col, np.ndarray):
        return col if col.dtype.kind in "iubfO" else col.astype(object)
    if isinstance(col, (list, tuple)):
        return np.fromiter(col, dtype=object, count=len(col))
    return np.asarray(col, dtype=object)


def _slow_str(arr: np.ndarray, name: str) -> np.ndarray:
    out = np.empty(len(arr), dtype=object)
    for i, v in enumerate(arr):
        out[i] = _scalar_str(v, name)
    return out


def _scalar_str(v: Any, name: str) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return ""
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        return str(int(v))
    if isinstance(v, (str, int, float, np.integer, np.floating)):
        return str(v)
    raise SpecError(f"field '{name}': expected scalar values, got {type(v).__name__}")


def _to_float(col: Any, name: str) -> np.ndarray:
    arr = _object_array(col)
    if arr.dtype.kind in "iubf":
        return arr.astype(np.float64)
    blank = pd.isna(arr) | (arr == "")
    nums = np.asarray(pd.to_numeric(np.where(blank, np.nan, arr), errors="coerce"), dtype=np.float64)
    bad = np.isnan(nums) & ~blank
    if bad.any():
        raise SpecError(f"field '{name}': expected numeric values, got {arr[bad][0]!r}")
    return nums
