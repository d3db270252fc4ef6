"""Feature stores: where the raw user and item values come from at request time.

Stores hold *raw* values (never token ids) so one store serves every model version and A/B
arm whatever their vocabularies. A store answers one question per request, "the user's row
and each candidate's row", in one round trip; a missing entity comes back as None and the
encoder turns it into OOV tokens. A store that cannot answer marks the result degraded
instead of failing the request, because a ranking call with default features is worth more
to the caller than an error.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from model.logs import kv

log = logging.getLogger(__name__)

Row = dict[str, Any]


@dataclass
class Fetched:
    user: Row | None
    items: list[Row | None]
    degraded: bool = False
    reason: str | None = None
    cache_hits: int = 0
    cache_misses: int = 0


class FeatureStore(Protocol):
    kind: str

    async def fetch(self, user_id: str, item_ids: Sequence[str]) -> Fetched: ...

    async def ping(self) -> bool: ...

    async def close(self) -> None: ...


def entity_key(prefix: str, entity: str, entity_id: object) -> str:
    """`{prefix}:{entity}:{id}`; ids are strings so 42 and "42" are one entity."""
    return f"{prefix}:{entity}:{entity_id}"


def _clean(value: Any) -> Any:
    """Drop NaN/None (they are 'absent', hence OOV) and unwrap numpy scalars."""
    if value is None:
        return None
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def read_entity_table(path: str | Path, entity: str) -> dict[str, Row]:
    """A users/items table (parquet or CSV) as {id: {field: raw value}}."""
    from model.readers import read_table

    df = read_table(Path(path))
    id_col = next((c for c in (f"{entity}_id", entity) if c in df.columns), None)
    if id_col is None:
        raise ValueError(f"{path}: no '{entity}_id' (or '{entity}') column")
    out: dict[str, Row] = {}
    for rec in df.to_dict(orient="records"):
        row = {k: v for k, v in ((k, _clean(v)) for k, v in rec.items()) if v is not None}
        out[str(row[id_col])] = row
    return out


class TTLCache:
    """A small LRU with a time-to-live for hot item rows.

    Popular items appear in most requests; keeping their rows in-process saves a large share
    of the Redis payload. The TTL bounds staleness after an item's features change.
    """

    def __init__(self, max_entries: int, ttl_s: float) -> None:
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self._data: OrderedDict[str, tuple[float, Row]] = OrderedDict()

    def get(self, key: str, now: float) -> Row | None:
        hit = self._data.get(key)
        if hit is None:
            return None
        expires, row = hit
        if expires < now:
            del self._data[key]
            return None
        self._data.move_to_end(key)
        return row

    def put(self, key: str, row: Row, now: float) -> None:
        if self.max_entries <= 0:
            return
        self._data[key] = (now + self.ttl_s, row)
        self._data.move_to_end(key)
        while len(self._data) > self.max_entries:
            self._data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)


class InMemoryFeatureStore:
    """The embedded store: user and item tables held in dicts (quickstart, tests, dev)."""

    kind = "memory"

    def __init__(self, users: dict[str, Row] | None = None, items: dict[str, Row] | None = None) -> None:
        self.users = users or {}
        self.items = items or {}

    @classmethod
    def from_tables(cls, users_table: str | Path | None, items_table: str | Path | None) -> "InMemoryFeatureStore":
        users = read_entity_table(users_table, "user") if users_table else {}
        items = read_entity_table(items_table, "item") if items_table else {}
        log.info("feature_store %s", kv(kind="memory", users=len(users), items=len(items)))
        return cls(users, items)

    async def fetch(self, user_id: str, item_ids: Sequence[str]) -> Fetched:
        get = self.items.get
        return Fetched(user=self.users.get(str(user_id)), items=[get(str(i)) for i in item_ids])

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        return None


def _cluster_url(url: str) -> tuple[str, bool]:
    for scheme in ("redis+cluster://", "rediss+cluster://"):
        if url.startswith(scheme):
            return url.replace("+cluster", "", 1), True
    return url, False


@dataclass
class RedisFeatureStore:
    """Redis hashes `{prefix}:{user|item}:{id}` read with one pipelined round trip.

    `redis+cluster://host:port` selects Redis Cluster (the cluster pipeline splits the
    HGETALLs by slot and sends them to each node concurrently). Retries are off: a request has
    a few milliseconds, so a failed read degrades now rather than retrying past the deadline;
    the client reconnects by itself on a later request once Redis is back.
    """

    url: str
    prefix: str = "ctr"
    timeout_s: float = 0.05
    cache_items: int = 10_000
    cache_ttl_s: float = 30.0
    kind: str = "redis"
    _client: Any = field(default=None, init=False, repr=False)
    _cache: TTLCache = field(init=False, repr=False)

    def __post_init__(self) -> None:
        from redis.asyncio import Redis
        from redis.asyncio.cluster import RedisCluster

        url, cluster = _cluster_url(self.url)
        common = dict(decode_responses=True, socket_timeout=self.timeout_s, socket_connect_timeout=self.timeout_s)
        if cluster:
            self._client = RedisCluster.from_url(url, **common)
            self.kind = "redis_cluster"
        else:
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff

            self._client = Redis.from_url(url, retry=Retry(NoBackoff(), 0), health_check_interval=0, **common)
        self._cache = TTLCache(self.cache_items, self.cache_ttl_s)

    async def fetch(self, user_id: str, item_ids: Sequence[str]) -> Fetched:
        now = time.monotonic()
        items: list[Row | None] = [None] * len(item_ids)
        todo: list[int] = []
        # The cache lookup is inlined (one dict probe per item, no method calls): with hot
        # items it is most of this function's CPU time.
        data = self._cache._data
        probe, touch = data.get, data.move_to_end
        for i, item_id in enumerate(item_ids):
            key = item_id if type(item_id) is str else str(item_id)
            hit = probe(key)
            if hit is not None and hit[0] >= now:
                items[i] = hit[1]
                touch(key)
            else:
                todo.append(i)
        hits = len(item_ids) - len(todo)
        try:
            # asyncio.timeout, not wait_for: no extra task per request.
            async with asyncio.timeout(self.timeout_s * 2):
                if todo:
                    pipe = self._client.pipeline(transaction=False)
                    pipe.hgetall(entity_key(self.prefix, "user", user_id))
                    for i in todo:
                        pipe.hgetall(entity_key(self.prefix, "item", item_ids[i]))
                    replies = await pipe.execute()
                else:  # every item cached: one plain command, cheaper than a pipeline
                    replies = [await self._client.hgetall(entity_key(self.prefix, "user", user_id))]
        except Exception as exc:  # any store failure degrades; the reason is counted
            return Fetched(None, items, degraded=True, reason=type(exc).__name__, cache_hits=hits, cache_misses=len(todo))
        put = self._cache.put
        for i, row in zip(todo, replies[1:]):
            if row:
                items[i] = row
                put(str(item_ids[i]), row, now)
        return Fetched(replies[0] or None, items, cache_hits=hits, cache_misses=len(todo))

    async def ping(self) -> bool:
        try:
            return bool(await asyncio.wait_for(self._client.ping(), timeout=max(self.timeout_s * 4, 0.2)))
        except Exception:
            return False

    async def close(self) -> None:
        try:
            await self._client.aclose()
        except Exception:  # closing a dead connection must not block shutdown
            pass


def build_store(cfg: "Any") -> FeatureStore:
    """Redis when a URL is configured, else the embedded store from the configured tables."""
    if cfg.redis_url:
        return RedisFeatureStore(cfg.redis_url, cfg.prefix, cfg.timeout_s, cfg.cache_items, cfg.cache_ttl_s)
    return InMemoryFeatureStore.from_tables(cfg.users_table, cfg.items_table)


def _redis_value(v: Any) -> str | int | float:
    """Redis stores strings; floats keep their repr so numeric buckets match the table's."""
    if isinstance(v, bool) or not isinstance(v, (str, int, float)):
        return str(v)
    return v


def bulk_load(
    table: str | Path, entity: str, url: str, prefix: str = "ctr", ttl_s: int = 0, chunk: int = 2000
) -> dict[str, float]:
    """Write a users/items table into Redis hashes with pipelining; returns rows and rows/s.

    One HSET (+EXPIRE) per row, sent `chunk` rows per round trip: the network, not Redis,
    is the bottleneck of a bulk load, so the round-trip count is what matters.
    """
    import redis
    from redis.cluster import RedisCluster

    plain, cluster = _cluster_url(url)
    client = RedisCluster.from_url(plain) if cluster else redis.Redis.from_url(plain)
    rows = read_entity_table(table, entity)
    t0 = time.perf_counter()
    pipe = client.pipeline(transaction=False)
    n = 0
    for entity_id, row in rows.items():
        key = entity_key(prefix, entity, entity_id)
        pipe.delete(key)
        pipe.hset(key, mapping={k: _redis_value(v) for k, v in row.items()})
        if ttl_s:
            pipe.expire(key, ttl_s)
        n += 1
        if n % chunk == 0:
            pipe.execute()
    pipe.execute()
    seconds = time.perf_counter() - t0
    client.close()
    return {"rows": n, "seconds": seconds, "rows_per_s": n / max(seconds, 1e-9)}
