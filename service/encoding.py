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
        for name in self.user_fields:
            value = user_value(name, context, user_id, self.user_id_field, user, missing)
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


class FastEncoder:
    """The request encoder of the hot path: same tokens as `RequestEncoder`, less Python.

    Encoding 100 row values per field through `FeatureSpec.encode` costs ~0.4 ms a request,
    mostly per-field type inference on short object columns, while almost every value repeats:
    a hot item's stored row is the same dict object on every request (the item cache and the
    embedded store hand out one object per entity), and user/context values come from small
    sets. So:

    * item-sourced fields are encoded once per (item id, stored row object) and kept as one
      row of a token arena; a request gathers its items' rows with one fancy index. A row that
      changes in the store is a new object, so its tokens are encoded afresh (never stale);
    * user and context fields are one value per request: each value's token is memoised;
    * cross fields are hashed over the assembled token matrix by the spec itself;
    * an item with per-item `features` overrides takes the general path, row by row.

    Every token still comes out of `FeatureSpec.encode`, so offline/online parity holds by
    construction (the parity test checks it). Not thread-safe: it runs on the event loop.
    """

    MAX_MEMO = 100_000  # per-field values memoised before the memo starts over
    MAX_ITEMS = 200_000  # arena rows before the item cache starts over

    def __init__(self, base: RequestEncoder) -> None:
        self.base = base
        spec = base.spec
        self.spec = spec
        names = spec.field_names
        self.pos = {n: i for i, n in enumerate(names)}
        self.user_fields = base.user_fields
        self.context_fields = base.context_fields
        self.item_fields = base.item_fields
        self.item_pos = np.array([self.pos[n] for n in self.item_fields], dtype=np.intp)
        self.crosses = [(j, f, [self.pos[i] for i in f.inputs]) for j, f in enumerate(spec.fields) if f.kind == "cross"]
        self._memo: dict[str, dict[Any, int]] = {n: {} for n in names}
        self._items: dict[str, tuple[Any, int, tuple[str, ...]]] = {}  # key -> (row object, arena index, absent fields)
        self._arena = np.empty((1024, len(self.item_fields)), dtype=np.int64)
        self._used = 0

    # ------------------------------------------------------------------ scalars
    def _scalar(self, name: str, value: Any) -> int:
        """Token of one value of one field; (type, value) keys keep True apart from 1."""
        memo = self._memo[name]
        key = (type(value), value)
        try:
            return memo[key]
        except KeyError:
            pass
        except TypeError:  # unhashable: the spec refuses it with the field's name
            return int(self.spec.encode({name: [value]}, strict=False)[0, self.pos[name]])
        token = int(self.spec.encode({name: [value]}, strict=False)[0, self.pos[name]])
        if len(memo) >= self.MAX_MEMO:
            memo.clear()
        memo[key] = token
        return token

    # ------------------------------------------------------------------ items
    def _item_rows(self, item_ids: Sequence[Any], items: Sequence[Row | None], missing: Missing | None, shadowed: frozenset[str]) -> np.ndarray:
        """Arena indexes of each item's item-field tokens, encoding the rows not cached yet.

        `shadowed` are item fields the request context sets for every item: a stored value
        that is absent there is not missing."""
        cache = self._items
        idx = [0] * len(item_ids)
        todo: list[int] = []
        gaps: list[tuple[str, ...]] = []
        for i, (item_id, row) in enumerate(zip(item_ids, items)):
            hit = cache.get(item_id if type(item_id) is str else str(item_id))
            if hit is not None and hit[0] is row:
                idx[i] = hit[1]
                if hit[2]:
                    gaps.append(hit[2])
            else:
                todo.append(i)
        if todo and self._used + len(todo) > self.MAX_ITEMS:
            # Start over, and re-encode this request's hits too: their arena rows are reused.
            self._items.clear()
            self._used = 0
            todo, gaps = list(range(len(item_ids))), []
        if todo:
            gaps.extend(g for g in self._encode_items(item_ids, items, todo, idx) if g)
        if missing is not None and gaps:
            missing.add("item_field", sum(len(g) if not shadowed else sum(1 for n in g if n not in shadowed) for g in gaps))
        return np.array(idx, dtype=np.intp)

    def _encode_items(self, item_ids: Sequence[Any], items: Sequence[Row | None], todo: list[int], idx: list[int]) -> list[tuple[str, ...]]:
        n = len(todo)
        if self._used + n > self._arena.shape[0]:
            grown = np.empty((max(2 * self._arena.shape[0], self._used + n), self._arena.shape[1]), dtype=np.int64)
            grown[: self._used] = self._arena[: self._used]
            self._arena = grown
        id_field = self.base.item_id_field
        cols: dict[str, list[Any]] = {}
        gaps: list[list[str]] = [[] for _ in range(n)]
        for name in self.item_fields:
            if name == id_field:
                cols[name] = [item_ids[i] for i in todo]
                continue
            col = []
            for k, i in enumerate(todo):
                row = items[i]
                v = row.get(name) if row is not None else None
                if v is None and row is not None:
                    gaps[k].append(name)
                col.append(v)
            cols[name] = col
        tokens = self.spec.encode(cols, strict=False)[:, self.item_pos]
        start = self._used
        self._arena[start : start + n] = tokens
        self._used += n
        for k, i in enumerate(todo):
            key = item_ids[i] if type(item_ids[i]) is str else str(item_ids[i])
            self._items[key] = (items[i], start + k, tuple(gaps[k]))
            idx[i] = start + k
        return [tuple(g) for g in gaps]

    # ------------------------------------------------------------------ request
    def encode_request(
        self,
        user_id: Any,
        user: Row | None,
        items: Sequence[Row | None],
        item_ids: Sequence[Any],
        item_features: Sequence[Row | None],
        context: Row,
        missing: Missing | None = None,
    ) -> np.ndarray:
        """Tokens [len(item_ids), F]; the same as `RequestEncoder.columns` + `encode`."""
        n = len(item_ids)
        spec_f = self.spec.num_fields
        out = np.empty((n, spec_f), dtype=np.int64)
        base = self.base
        if missing is not None:
            if user is None:
                missing.add("user", 1)
            unknown = sum(1 for r in items if r is None)
            if unknown:
                missing.add("item", unknown)
        for name in self.user_fields:
            value = user_value(name, context, user_id, base.user_id_field, user, missing)
            out[:, self.pos[name]] = self._scalar(name, value)
        overridden = [f for f in item_features if f]
        for name in self.context_fields:
            value = context.get(name)
            if value is None and missing is not None and not any(name in f for f in overridden):
                missing.add("context_field", 1)
            out[:, self.pos[name]] = self._scalar(name, value)
        if self.item_fields:
            shadowed = frozenset(n for n in self.item_fields if n in context) if context else frozenset()
            rows_idx = self._item_rows(item_ids, items, missing, shadowed)  # may grow the arena: index after
            out[:, self.item_pos] = self._arena[rows_idx]
            for name in shadowed:  # a context value wins over every stored item value
                out[:, self.pos[name]] = self._scalar(name, context[name])
        for j, f, inputs in self.crosses:
            # The spec's own hash (a private method, used so the formula lives in one place).
            out[:, j] = self.spec.hash_cross(out[:, inputs], f)
        if overridden:
            rows = [i for i, f in enumerate(item_features) if f]
            sub = base.columns(user_id, user, [items[i] for i in rows], [item_ids[i] for i in rows], [item_features[i] for i in rows], context)
            out[rows] = base.encode(sub)
        return out


def user_value(name: str, context: Any, user_id: Any, user_id_field: str, user: Any, missing: Any) -> Any:
    """One precedence for a user field in every encoder: request context, then the request's
    user id, then the stored user row (a stored user lacking the field is counted)."""
    if name in context:
        return context[name]
    if name == user_id_field:
        return user_id
    value = (user or _EMPTY).get(name)
    if value is None and user is not None and missing is not None:
        missing.add("user_field", 1)
    return value
