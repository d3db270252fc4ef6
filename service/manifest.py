"""The feature manifest: what `ctr features load` put into Redis, so losing it is noticed.

A FLUSHDB, an eviction or an expiry leaves a scoring service that still answers 200 with every
user and item defaulted: scores move and nothing fails. So each load writes, next to the rows
and under the same key prefix, one manifest per entity (`{prefix}:manifest:{entity}`): the
fields loaded, the row count, the table's sha256, the load time, and a sample of the loaded
ids spread over the table. The service checks it: the manifest must be there, name the fields
the served models read, and every sampled id must still have its row. A flush removes the
manifest; an eviction or expiry of rows removes sampled ids long before most rows are gone.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

FORMAT = 1
SAMPLE_SIZE = 32
ENTITIES = ("user", "item")


def manifest_key(prefix: str, entity: str) -> str:
    return f"{prefix}:manifest:{entity}"


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def spread_sample(ids: Sequence[str], k: int = SAMPLE_SIZE) -> list[str]:
    """Up to k ids evenly spread over the table (first and last included)."""
    n = len(ids)
    if n <= k:
        return list(ids)
    return [ids[round(i * (n - 1) / (k - 1))] for i in range(k)]


@dataclass(frozen=True)
class Manifest:
    entity: str
    fields: list[str]
    rows: int
    fingerprint: str
    loaded_at: float
    source: str = ""
    ttl_s: int = 0
    sample: list[str] = field(default_factory=list)
    format: int = FORMAT

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> "Manifest":
        data = json.loads(text)
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


@dataclass
class EntityCheck:
    entity: str
    ok: bool
    reason: str | None = None
    rows: int = 0
    fields: list[str] = field(default_factory=list)
    fingerprint: str | None = None
    loaded_at: float | None = None
    sample_found: int = 0
    sample_total: int = 0


@dataclass
class FeatureCheck:
    """The store's answer to "is the feature data that was loaded still there?"."""

    ok: bool
    store: str
    entities: dict[str, EntityCheck] = field(default_factory=dict)
    reason: str | None = None
    checked_at: float = field(default_factory=time.time)

    @property
    def rows(self) -> int:
        return sum(e.rows for e in self.entities.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "store": self.store,
            "reason": self.reason,
            "rows": self.rows,
            "entities": {k: asdict(v) for k, v in self.entities.items()},
        }


def judge(entity: str, manifest: Manifest | None, needed: Sequence[str] | None, sample_found: int, required: bool) -> EntityCheck:
    """One entity's verdict. `needed`: the stored fields the served models read (None: unknown)."""
    if manifest is None:
        return EntityCheck(entity, ok=not required, reason="no_manifest")
    check = EntityCheck(entity, ok=True, rows=manifest.rows, fields=list(manifest.fields), fingerprint=manifest.fingerprint,
                        loaded_at=manifest.loaded_at, sample_found=sample_found, sample_total=len(manifest.sample))
    lacking = [f for f in (needed or ()) if f not in manifest.fields]
    if manifest.rows <= 0:
        check.ok, check.reason = False, "empty"
    elif sample_found < len(manifest.sample):
        check.ok, check.reason = False, "rows_lost"
    elif lacking:
        check.ok, check.reason = False, "fields_missing:" + ",".join(lacking)
    return check
