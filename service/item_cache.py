"""Item rows and their tokens, cached by numbered slot so a hot request does no per-item Python work.

Two caches, one key. The feature store keeps raw item rows in an `ItemRowCache` (one per store,
shared by every model version, since rows are raw values); each slot has a generation that
changes whenever the slot gets a new row (a refetch after the TTL, or eviction). Each loaded
model version keeps the rows it has encoded as tokens in its own `ItemTokenCache`, indexed by the
same slot and stamped with the generation it encoded. A token row is valid exactly while its
stamp equals the slot's generation, so:

* a new model version starts with an empty token cache (reload invalidates);
* a row refetched after the TTL is a new generation, so it is encoded afresh (never stale);
* both caches are bounded: the row cache by its slot count, the token cache by the same slots.

Lookups are vectorised: a request of 100 hot items costs one `dict.get` per item (in C, via
`map`) and a handful of numpy operations, instead of per-item Python code in two places.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import repeat
from typing import Any

import numpy as np

Row = dict[str, Any]
NO_SLOT = -1


class FetchedItems(list):
    """Item rows in request order (None: the store has no such item), with the cache slots they
    were read from and each slot's generation at that moment.

    A list, so every caller that only wants the rows keeps working; an encoder that knows the
    slots gathers cached tokens instead of encoding the rows again.
    """

    __slots__ = ("cache", "slots", "gens")

    def __init__(self, rows: Sequence[Row | None], cache: "ItemRowCache | None" = None,
                 slots: np.ndarray | None = None, gens: np.ndarray | None = None) -> None:
        super().__init__(rows)
        self.cache = cache
        self.slots = slots
        self.gens = gens

    def valid_slots(self) -> np.ndarray | None:
        """Slots still holding the row this list holds (NO_SLOT elsewhere).

        A slot may have been given to another item since the fetch (eviction or a refetch by a
        concurrent request, e.g. before a shadow variant encodes); its tokens are then not ours.
        """
        if self.cache is None or self.slots is None:
            return None
        held = self.cache.gen[self.slots] == self.gens
        return self.slots if held.all() else np.where(held, self.slots, NO_SLOT)


def _int_alias(key: str) -> int | None:
    """The integer a canonical integer string names ("42" -> 42; "042", "4.2" -> None)."""
    if key[:1].isdigit() or (key[:1] == "-" and key[1:2].isdigit()):
        try:
            value = int(key)
        except ValueError:
            return None
        return value if str(value) == key else None
    return None


class ItemRowCache:
    """Raw item rows in `capacity` numbered slots with a time-to-live (inf: never expires).

    Eviction is a clock (second chance): a slot read since the last sweep survives it. That
    keeps a hit down to a vectorised bit set, where an LRU would move a dict entry per item.
    A row of None is a cached "the store has no such item", so unknown ids are not refetched
    on every request either.
    """

    def __init__(self, capacity: int, ttl_s: float) -> None:
        self.capacity = cap = max(int(capacity), 0)
        self.ttl_s = float(ttl_s)
        # One spare slot at the end, never given out: NO_SLOT (-1) indexes it, so a miss reads
        # a None row without a branch per item.
        self.index: dict[str, int] = {}
        self.keys: list[str | None] = [None] * (cap + 1)
        self.rows: list[Row | None] = [None] * (cap + 1)
        self.expires = np.full(cap + 1, -np.inf)
        self.gen = np.zeros(cap + 1, dtype=np.int64)
        self.used = np.zeros(cap + 1, dtype=bool)
        self.ref = np.zeros(cap + 1, dtype=bool)
        self._free = list(range(cap - 1, -1, -1))

    def __len__(self) -> int:
        return int(self.used.sum())

    def lookup(self, keys: Sequence[str | int], now: float) -> np.ndarray:
        """Slot of each id (a string, or an integer: 42 and "42" are one item), NO_SLOT for a
        miss or an expired row. Integer ids are indexed as such too, so a request of integer
        ids is looked up without formatting 100 strings."""
        n = len(keys)
        slots = np.fromiter(map(self.index.get, keys, repeat(NO_SLOT, n)), dtype=np.intp, count=n)
        live = self.expires[slots] >= now  # the spare slot never is
        if not live.all():
            slots[~live] = NO_SLOT
        self.ref[slots] = True
        return slots

    def rows_at(self, slots: np.ndarray) -> list[Row | None]:
        """The row in each slot (None for NO_SLOT)."""
        return list(map(self.rows.__getitem__, slots.tolist()))

    def put(self, keys: Sequence[str | int], rows: Sequence[Row | None], now: float) -> tuple[np.ndarray, np.ndarray]:
        """Store rows (None: known absent); returns their slots (NO_SLOT where none is free) and
        the generation each got (a slot reused later in the same call has moved past it)."""
        out = np.full(len(keys), NO_SLOT, dtype=np.intp)
        gens = np.zeros(len(keys), dtype=np.int64)
        if not self.capacity:
            return out, gens
        expires = now + self.ttl_s
        for k, (key, row) in enumerate(zip(keys, rows)):
            slot = self.index.get(key)
            if slot is None:
                if not self._free:
                    self._sweep(now, max(len(keys) - k, self.capacity // 8, 1))
                    if not self._free:
                        break
                slot = self._free.pop()
                text = key if type(key) is str else str(key)
                self.index[text] = slot
                alias = _int_alias(text)
                if alias is not None:
                    self.index[alias] = slot
                self.keys[slot] = text
                self.used[slot] = True
            self.rows[slot] = row
            self.expires[slot] = expires
            self.gen[slot] += 1
            self.ref[slot] = True
            out[k] = slot
            gens[k] = self.gen[slot]
        return out, gens

    def _sweep(self, now: float, want: int) -> None:
        """Free expired slots, then slots not read since the last sweep, at least `want` of them."""
        victims = np.flatnonzero(self.used & (self.expires < now))
        if len(victims) < want:
            cold = np.flatnonzero(self.used & ~self.ref)
            victims = np.union1d(victims, cold[: want - len(victims)])
            if len(victims) < want:  # everything was read recently: second chance is spent
                rest = np.flatnonzero(self.used)
                victims = np.union1d(victims, np.setdiff1d(rest, victims)[: want - len(victims)])
            self.ref[:] = False
        for s in victims.tolist():
            text = self.keys[s]
            del self.index[text]
            alias = _int_alias(text)
            if alias is not None:
                self.index.pop(alias, None)
            self.keys[s] = None
            self.rows[s] = None
            self.used[s] = False
            self.gen[s] += 1
            self._free.append(s)

    def clear(self) -> None:
        """Forget every row (e.g. the fields read from the store changed)."""
        self.index.clear()
        self.keys = [None] * (self.capacity + 1)
        self.rows = [None] * (self.capacity + 1)
        self.expires[:] = -np.inf
        self.gen += 1
        self.used[:] = False
        self.ref[:] = False
        self._free = list(range(self.capacity - 1, -1, -1))


class ItemTokenCache:
    """One model version's item-side tokens by row-cache slot, valid while the slot's generation
    matches the stamp. `gaps` holds, per slot, a bitmask of the item fields the stored row lacked
    (for the missing-field counts). Sized to its row cache (one per store), spare slot included:
    the spare's stamp stays -1, so NO_SLOT never matches."""

    def __init__(self, width: int) -> None:
        self.width = width
        self.rows: ItemRowCache | None = None
        self._size(0)

    def _size(self, size: int) -> None:
        self.tokens = np.zeros((size, self.width), dtype=np.int64)
        self.stamp = np.full(size, -1, dtype=np.int64)
        self.gaps = np.zeros(size, dtype=np.int64)

    def bind(self, rows: ItemRowCache) -> None:
        """Key by this row cache's slots (a different row cache: start over)."""
        if rows is not self.rows:
            self.rows = rows
            self._size(rows.capacity + 1)

    def stale(self, slots: np.ndarray, gens: np.ndarray) -> np.ndarray:
        """Positions (into `slots`) whose tokens are not cached for this generation."""
        return np.flatnonzero(self.stamp[slots] != gens)

    def store(self, slots: np.ndarray, gens: np.ndarray, tokens: np.ndarray, gaps: np.ndarray) -> None:
        keep = slots >= 0
        s = slots[keep]
        self.tokens[s] = tokens[keep]
        self.stamp[s] = gens[keep]
        self.gaps[s] = gaps[keep]
