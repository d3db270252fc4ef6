"""A/B assignment: a stable hash of (salt, user_id) onto the variants' weights.

The hash (not a random draw, not a stored table) makes assignment reproducible across
replicas and restarts without shared state; changing the salt reshuffles every user at
once, which is how a new experiment starts from a clean split.
"""

from __future__ import annotations

import hashlib
from bisect import bisect_right
from collections.abc import Sequence


class UnknownVariant(LookupError):
    pass


class Assigner:
    def __init__(self, names: Sequence[str], weights: Sequence[float], salt: str) -> None:
        if not names:
            raise ValueError("at least one variant is needed")
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate variant names: {list(names)}")
        total = float(sum(weights))
        if total <= 0:
            raise ValueError("variant weights must not all be zero")
        self.names = list(names)
        self.salt = salt
        self._edges: list[float] = []
        acc = 0.0
        for w in weights[:-1]:
            acc += w / total
            self._edges.append(acc)

    @staticmethod
    def unit(salt: str, user_id: object) -> float:
        """A uniform number in [0, 1) fixed by (salt, user_id)."""
        digest = hashlib.blake2b(f"{salt}\x1f{user_id}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") / 2.0**64

    def assign(self, user_id: object, explicit: str | None = None) -> str:
        if explicit is not None:
            if explicit not in self.names:
                raise UnknownVariant(explicit)
            return explicit
        if len(self.names) == 1:
            return self.names[0]
        return self.names[bisect_right(self._edges, self.unit(self.salt, user_id))]
