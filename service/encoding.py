"""Turn one request (user, context, candidates) into the model's int64 tokens.

The columns are assembled from the stored rows and the request, then encoded by the very
FeatureSpec the model was trained with (one vectorised pass per field), so offline and online
tokens cannot drift. Precedence per value, highest first: the item's request features, the
request context, the stored user/item row. The entity ids come from the request itself, so
an unknown user still gets its id token (or OOV) and only its side features default.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from model.spec import FeatureSpec

Row = Mapping[str, Any]
_EMPTY: dict[str, Any] = {}


@dataclass
class Missing:
    """What fell back to the OOV/default token, by entity (fed to ctr_feature_missing_total)."""

    counts: dict[str, int] = field(default_factory=dict)

    def add(self, entity: str, n: int) -> None:
        if n:
            self.counts[entity] = self.counts.get(entity, 0) + n


def id_field(entity: str, fields: Sequence[str]) -> str | None:
    """The field that carries the entity's id: `user_id` (synthetic) or plain `user` (Frappe)."""
    for name in (f"{entity}_id", entity):
        if name in fields:
            return name
    return None


@dataclass(frozen=True)
class RequestEncoder:
    """Per-spec column plan, computed once per loaded model version."""

    spec: FeatureSpec
    user_fields: tuple[str, ...]
    item_fields: tuple[str, ...]
    context_fields: tuple[str, ...]

    user_id_field: str | None = None
    item_id_field: str | None = None

    @classmethod
    def for_spec(cls, spec: FeatureSpec) -> "RequestEncoder":
        users, items = spec.fields_from("user"), spec.fields_from("item")
        return cls(
            spec,
            tuple(users),
            tuple(items),
            tuple(spec.fields_from("context")),
            id_field("user", users),
            id_field("item", items),
        )

    def columns(
        self,
        user_id: Any,
        user: Row | None,
        items: Sequence[Row | None],
        item_ids: Sequence[Any],
        item_features: Sequence[Row | None],
        context: Row,
        missing: Missing | None = None,
    ) -> dict[str, list[Any]]:
        n = len(item_ids)
        cols: dict[str, list[Any]] = {}
        overrides = any(item_features)
        feats = [f or _EMPTY for f in item_features] if overrides else None
        if missing is not None:
            if user is None:
                missing.add("user", 1)
            missing.add("item", sum(1 for r in items if r is None))
        urow = user or _EMPTY
        for name in self.user_fields:
            if name in context:
                value = context[name]
            elif name == self.user_id_field:
                value = user_id
            else:
                value = urow.get(name)
                if value is None and user is not None and missing is not None:
                    missing.add("user_field", 1)
            cols[name] = [value] * n
        for name in self.item_fields:
            if name in context:
                col = [context[name]] * n
            elif name == self.item_id_field:
                col = list(item_ids)
            else:
                col = [(r.get(name) if r is not None else None) for r in items]
                if missing is not None:
                    missing.add("item_field", sum(1 for r, v in zip(items, col) if r is not None and v is None))
            cols[name] = col
        for name in self.context_fields:
            value = context.get(name)
            if value is None and missing is not None and not (feats and any(name in f for f in feats)):
                missing.add("context_field", 1)
            cols[name] = [value] * n
        if feats:
            for i, f in enumerate(feats):
                for k, v in f.items():
                    if k in cols:
                        cols[k][i] = v
        return cols

    def encode(self, cols: Mapping[str, list[Any]]) -> np.ndarray:
        return self.spec.encode(cols, strict=False)
