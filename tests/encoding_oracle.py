"""The plain request encoding the service's encoder must match: the parity oracle.

This is the general path the service once ran per request: assemble every column of the
request from the stored rows and the request (one list per field, with the documented
precedence: item features > context > stored row; ids from the request), then encode the
columns with `FeatureSpec.encode` in one pass. It has no caches and no memo, so what it
returns is what the spec says; `service.encoding.RequestEncoder` must give the same tokens
and the same missing counts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from model.spec import FeatureSpec
from service.encoding import FieldPlan, Missing, user_value

Row = Mapping[str, Any]
_EMPTY: dict[str, Any] = {}


def columns(
    plan: FieldPlan,
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
    feats = [f or _EMPTY for f in item_features] if any(item_features) else None
    if missing is not None:
        if user is None:
            missing.add("user", 1)
        missing.add("item", sum(1 for r in items if r is None))
    for name in plan.user:
        cols[name] = [user_value(name, context, user_id, plan.user_id, user, missing)] * n
    for name in plan.item:
        if name in context:
            col = [context[name]] * n
        elif name == plan.item_id:
            col = list(item_ids)
        else:
            col = [(r.get(name) if r is not None else None) for r in items]
            if missing is not None:
                missing.add("item_field", sum(1 for r, v in zip(items, col) if r is not None and v is None))
        cols[name] = col
    for name in plan.context:
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


def encode(spec: FeatureSpec, user_id: Any, user: Row | None, items: Sequence[Row | None], item_ids: Sequence[Any],
           item_features: Sequence[Row | None], context: Row, missing: Missing | None = None) -> np.ndarray:
    """Tokens [len(item_ids), F] of one request, the plain way."""
    cols = columns(FieldPlan.for_spec(spec), user_id, user, items, item_ids, item_features, context, missing)
    return spec.encode(cols, strict=False)
