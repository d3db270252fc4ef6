"""Turn one request (user, context, candidates) into the model's int64 tokens.

Every token comes out of the very FeatureSpec the model was trained with, so offline and online
tokens cannot drift; the tests check it against a plain column-by-column encoding of the same
rows (tests/encoding_oracle.py). Precedence per value, highest first: the item's request
features, the request context, the stored user/item row. The entity ids come from the request
itself, so an unknown user still gets its id token (or OOV) and only its side features default.

Almost every value of a request repeats across requests, so little is encoded per request:

* item-side fields come from the model version's `ItemTokenCache`, indexed by the slot the
  feature store read the row from: a request gathers its items' token rows with one fancy
  index and encodes only rows it has not seen in their current generation (see item_cache);
* user and context fields are one value per request each: each value's token is memoised;
* cross fields are hashed over the assembled token matrix by the spec itself;
* an item with per-request `features` overrides is encoded row by row (it bypasses the cache).

Not thread-safe: it runs on the event loop.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from model.spec import FeatureSpec
from service.item_cache import FetchedItems, ItemTokenCache

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
class FieldPlan:
    """Which raw fields a spec reads from each source; the id fields come from the request."""

    user: tuple[str, ...]
    item: tuple[str, ...]
    context: tuple[str, ...]
    user_id: str | None = None
    item_id: str | None = None

    @classmethod
    def for_spec(cls, spec: FeatureSpec) -> "FieldPlan":
        users, items = spec.fields_from("user"), spec.fields_from("item")
        return cls(tuple(users), tuple(items), tuple(spec.fields_from("context")), id_field("user", users), id_field("item", items))

    @property
    def stored_user(self) -> tuple[str, ...]:
        """User fields a feature store must supply (all but the id)."""
        return tuple(n for n in self.user if n != self.user_id)

    @property
    def stored_item(self) -> tuple[str, ...]:
        return tuple(n for n in self.item if n != self.item_id)


class RequestEncoder:
    """The request encoder of one loaded model version (its token caches die with it)."""

    MAX_MEMO = 100_000  # per-field values memoised before the memo starts over

    def __init__(self, spec: FeatureSpec) -> None:
        self.spec = spec
        self.plan = plan = FieldPlan.for_spec(spec)
        self.user_fields, self.item_fields, self.context_fields = plan.user, plan.item, plan.context
        self.user_id_field, self.item_id_field = plan.user_id, plan.item_id
        self.pos = {n: i for i, n in enumerate(spec.field_names)}
        self.item_pos = np.array([self.pos[n] for n in self.item_fields], dtype=np.intp)
        self.request_pos = np.array([self.pos[n] for n in (*self.user_fields, *self.context_fields)], dtype=np.intp)
        self.crosses = [(j, f, [self.pos[i] for i in f.inputs]) for j, f in enumerate(spec.fields) if f.kind == "cross"]
        self._memo: dict[str, dict[Any, int]] = {n: {} for n in spec.field_names}
        self.items = ItemTokenCache(len(self.item_fields))

    @classmethod
    def for_spec(cls, spec: FeatureSpec) -> "RequestEncoder":
        return cls(spec)

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
    def _item_tokens(self, item_ids: Sequence[Any], items: Sequence[Row | None]) -> tuple[np.ndarray, np.ndarray]:
        """Item-field tokens [n, len(item_fields)] and, per item, a bitmask of the item fields its
        stored row lacks; cached rows are gathered, the others encoded (and cached when they have
        a slot)."""
        n = len(item_ids)
        cache = self.items
        slots = items.valid_slots() if isinstance(items, FetchedItems) else None
        if slots is None:  # rows without slots: encode them all, cache nothing
            return self._encode_items(item_ids, items, np.arange(n))
        cache.bind(items.cache)  # type: ignore[union-attr,arg-type]
        gens = items.gens  # type: ignore[union-attr]
        todo = cache.stale(slots, gens)
        if not len(todo):
            return cache.tokens[slots], cache.gaps[slots]
        fresh, fresh_gaps = self._encode_items(item_ids, items, todo)
        cache.store(slots[todo], gens[todo], fresh, fresh_gaps)
        if len(todo) == n:
            return fresh, fresh_gaps
        tokens, gaps = cache.tokens[slots], cache.gaps[slots]
        tokens[todo] = fresh
        gaps[todo] = fresh_gaps
        return tokens, gaps

    def _encode_items(self, item_ids: Sequence[Any], items: Sequence[Row | None], todo: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rows = [items[i] for i in todo.tolist()]
        cols: dict[str, list[Any]] = {}
        gaps = np.zeros(len(rows), dtype=np.int64)
        for b, name in enumerate(self.item_fields):
            if name == self.item_id_field:
                cols[name] = [item_ids[i] for i in todo.tolist()]
                continue
            col = [(r.get(name) if r is not None else None) for r in rows]
            for k, (r, v) in enumerate(zip(rows, col)):
                if v is None and r is not None:
                    gaps[k] |= 1 << b
            cols[name] = col
        return self.spec.encode(cols, strict=False)[:, self.item_pos], gaps

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
        """Tokens [len(item_ids), F]. `items` are the store's rows in item order; a
        `FetchedItems` (what the stores return) also names their cache slots."""
        n = len(item_ids)
        out = np.empty((n, self.spec.num_fields), dtype=np.int64)
        if missing is not None:
            if user is None:
                missing.add("user", 1)
            missing.add("item", items.count(None) if isinstance(items, list) else sum(1 for r in items if r is None))
        scalar = self._scalar
        row = [scalar(name, user_value(name, context, user_id, self.user_id_field, user, missing)) for name in self.user_fields]
        overridden = [f for f in item_features if f] if item_features else []
        for name in self.context_fields:
            value = context.get(name)
            if value is None and missing is not None and not any(name in f for f in overridden):
                missing.add("context_field", 1)
            row.append(scalar(name, value))
        if row:  # one value per request each: one broadcast assignment
            out[:, self.request_pos] = row
        if self.item_fields:
            tokens, gaps = self._item_tokens(item_ids, items)
            out[:, self.item_pos] = tokens
            shadowed = [b for b, name in enumerate(self.item_fields) if name in context] if context else []
            if missing is not None:
                bits = [b for b, name in enumerate(self.item_fields) if b not in shadowed and name != self.item_id_field]
                if gaps.any():
                    missing.add("item_field", sum(int(np.count_nonzero(gaps & (1 << b))) for b in bits))
            for b in shadowed:  # a context value wins over every stored item value
                name = self.item_fields[b]
                out[:, self.pos[name]] = self._scalar(name, context[name])
        for j, f, inputs in self.crosses:
            # The spec's own hash, so the formula lives in one place.
            out[:, j] = self.spec.hash_cross(out[:, inputs], f)
        if overridden:
            rows = [i for i, f in enumerate(item_features) if f]
            out[rows] = self._encode_overridden(user_id, user, items, item_ids, item_features, context, rows)
        return out

    def _encode_overridden(self, user_id: Any, user: Row | None, items: Sequence[Row | None], item_ids: Sequence[Any],
                           item_features: Sequence[Row | None], context: Row, rows: list[int]) -> np.ndarray:
        """Whole rows for items that carry request features: assembled column by column with the
        same precedence, then encoded by the spec (crosses included)."""
        k = len(rows)
        cols: dict[str, list[Any]] = {}
        for name in self.user_fields:
            cols[name] = [user_value(name, context, user_id, self.user_id_field, user, None)] * k
        for name in self.item_fields:
            if name in context:
                cols[name] = [context[name]] * k
            elif name == self.item_id_field:
                cols[name] = [item_ids[i] for i in rows]
            else:
                cols[name] = [(items[i] or _EMPTY).get(name) for i in rows]
        for name in self.context_fields:
            cols[name] = [context.get(name)] * k
        for r, i in enumerate(rows):
            for key, value in (item_features[i] or _EMPTY).items():
                if key in cols:
                    cols[key][r] = value
        return self.spec.encode(cols, strict=False)


def user_value(name: str, context: Any, user_id: Any, user_id_field: str | None, user: Any, missing: Any) -> Any:
    """One precedence for a user field: request context, then the request's user id, then the
    stored user row (a stored user lacking the field is counted)."""
    if name in context:
        return context[name]
    if name == user_id_field:
        return user_id
    value = (user or _EMPTY).get(name)
    if value is None and user is not None and missing is not None:
        missing.add("user_field", 1)
    return value
