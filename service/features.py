"""Feature stores: where the raw user and item values come from at request time.

Stores hold *raw* values (never token ids) so one store serves every model version and A/B
arm whatever their vocabularies. A store answers one question per request, "the user's row
and each candidate's row", in at most one round trip; a missing entity comes back as None and
the encoder turns it into OOV tokens. Item rows are kept in the store's `ItemRowCache` by slot,
so each model version can keep their tokens by the same slot (see service/item_cache.py).

A store that cannot answer marks the result degraded instead of failing the request, because a
ranking call with default features is worth more to the caller than an error. A store that
answers but has lost its data is degraded too, with reason "missing_features", once a request's
share of unknown entities passes the configured threshold; and `check()` compares the store
with the manifest `ctr features load` wrote (service/manifest.py), for readiness and a gauge.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from model.logs import kv
from service.deadline import LoopLag, ReplyDeadline
from service.encoding import FieldPlan
from service.item_cache import FetchedItems, ItemRowCache
from service.manifest import ENTITIES, FeatureCheck, Manifest, file_sha256, judge, manifest_key, spread_sample

log = logging.getLogger(__name__)

Row = dict[str, Any]
MISSING_FEATURES = "missing_features"


@dataclass
class Fetched:
    user: Row | None
    items: list[Row | None]
    degraded: bool = False
    reason: str | None = None
    cache_hits: int = 0
    cache_misses: int = 0

    @property
    def store_failed(self) -> bool:
        """Degraded because the store did not answer (not because it answered "unknown")."""
        return self.degraded and self.reason != MISSING_FEATURES


class FeatureStore(Protocol):
    kind: str

    async def fetch(self, user_id: str, item_ids: Sequence[str]) -> Fetched: ...

    def use_fields(self, plan: FieldPlan) -> None: ...

    async def check(self, max_age_s: float = 1.0) -> FeatureCheck: ...

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


def _judge_missing(fetched: Fetched, threshold: float) -> Fetched:
    """Mark a request degraded when its share of unknown entities passes `threshold`."""
    if fetched.degraded or threshold >= 1.0:
        return fetched
    n = len(fetched.items)
    unknown = (fetched.user is None) + fetched.items.count(None)
    if unknown and unknown > threshold * (n + 1):
        fetched.degraded, fetched.reason = True, MISSING_FEATURES
    return fetched


class InMemoryFeatureStore:
    """The embedded store: user and item tables held in dicts (quickstart, tests, dev).

    Every item row gets a fixed slot of an `ItemRowCache` that never expires, so encoders keep
    its tokens; an unknown id gets no slot (it is encoded per request, and counted missing).
    """

    kind = "memory"

    def __init__(self, users: dict[str, Row] | None = None, items: dict[str, Row] | None = None, missing_share: float = 0.5) -> None:
        self.users = users or {}
        self.items = items or {}
        self.missing_share = missing_share
        self._rows = ItemRowCache(len(self.items), math.inf)
        keys = list(self.items)
        self._rows.put(keys, [self.items[k] for k in keys], 0.0)  # fixed slots; never evicted

    @classmethod
    def from_tables(cls, users_table: str | Path | None, items_table: str | Path | None, missing_share: float = 0.5) -> "InMemoryFeatureStore":
        users = read_entity_table(users_table, "user") if users_table else {}
        items = read_entity_table(items_table, "item") if items_table else {}
        if users or items:
            log.info("feature_store %s", kv(kind="memory", users=len(users), items=len(items)))
        else:
            log.warning("feature_store_empty %s", kv(kind="memory", users=0, items=0,
                                                     hint="no Redis URL and no users/items tables: every user and item is scored with default features"))
        return cls(users, items, missing_share)

    def use_fields(self, plan: FieldPlan) -> None:
        """Rows are in memory already: there is nothing to narrow."""

    async def fetch(self, user_id: str, item_ids: Sequence[str]) -> Fetched:
        cache = self._rows
        slots = cache.lookup(item_ids, 0.0)
        items = FetchedItems(cache.rows_at(slots), cache, slots, cache.gen[slots])
        return _judge_missing(Fetched(user=self.users.get(str(user_id)), items=items), self.missing_share)

    async def check(self, max_age_s: float = 1.0) -> FeatureCheck:
        """Always ok (the tables cannot vanish from memory); the row counts feed the gauge."""
        from service.manifest import EntityCheck

        entities = {e: EntityCheck(e, ok=True, rows=len(t)) for e, t in (("user", self.users), ("item", self.items))}
        empty = not (self.users or self.items)
        return FeatureCheck(ok=True, store=self.kind, entities=entities, reason="empty" if empty else None)

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        return None


def _cluster_url(url: str) -> tuple[str, bool]:
    for scheme in ("redis+cluster://", "rediss+cluster://"):
        if url.startswith(scheme):
            return url.replace("+cluster", "", 1), True
    return url, False


def _row(fields: Sequence[str] | None, reply: Any) -> Row | None:
    """A hash as a row: HMGET values by field, or HGETALL's reply (flat pairs in RESP2)."""
    if fields is None:
        if isinstance(reply, list):
            reply = dict(zip(reply[::2], reply[1::2]))
        return reply or None
    row = {f: v for f, v in zip(fields, reply) if v is not None}
    return row or None


@dataclass
class RedisFeatureStore:
    """Redis hashes `{prefix}:{user|item}:{id}` read with one pipelined round trip.

    Once the served models' fields are known (`use_fields`), only those are read (HMGET; the
    id fields come from the request, so an entity whose only field is its id is not read at
    all); until then whole hashes (HGETALL). Item rows are cached for `cache_ttl_s` in an
    `ItemRowCache`, so a request of hot items reads only its user, or nothing.

    `redis+cluster://host:port` selects Redis Cluster (the cluster pipeline splits the commands
    by slot and sends them to each node concurrently). Retries are off: a request has a few
    milliseconds, so a failed read degrades now rather than retrying past the deadline; the
    client reconnects by itself on a later request once Redis is back. The deadline is a
    `ReplyDeadline`: `timeout_s` from the send, by the store's clock, not the loop's.
    """

    url: str
    prefix: str = "ctr"
    timeout_s: float = 0.05
    cache_items: int = 10_000
    cache_ttl_s: float = 30.0
    missing_share: float = 0.5
    require_manifest: bool = True
    kind: str = "redis"
    _client: Any = field(default=None, init=False, repr=False)
    _rows: ItemRowCache = field(init=False, repr=False)
    _lag: LoopLag = field(default_factory=LoopLag, init=False, repr=False)
    _user_fields: tuple[str, ...] | None = field(default=None, init=False, repr=False)
    _item_fields: tuple[str, ...] | None = field(default=None, init=False, repr=False)
    _needs: dict[str, tuple[str, ...]] = field(default_factory=dict, init=False, repr=False)
    _last_check: FeatureCheck | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        from redis.asyncio import Redis
        from redis.asyncio.cluster import RedisCluster

        url, cluster = _cluster_url(self.url)
        # The socket timeouts are only a backstop: the ReplyDeadline decides when a read is late.
        backstop = max(1.0, 10 * self.timeout_s)
        # No CLIENT SETINFO on connect: two round trips less for every new connection.
        common = dict(decode_responses=True, socket_timeout=backstop, socket_connect_timeout=backstop, driver_info=None)
        if cluster:
            self._client = RedisCluster.from_url(url, **common)
            self.kind = "redis_cluster"
        else:
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff

            self._client = Redis.from_url(url, retry=Retry(NoBackoff(), 0), health_check_interval=0, **common)
        self._rows = ItemRowCache(self.cache_items, self.cache_ttl_s)

    def use_fields(self, plan: FieldPlan) -> None:
        """Read a served model's fields too (the store reads the union over every model).

        An entity is read only when a model reads a stored field of it besides its id (the id
        comes from the request); the id field is read along, so an entity that exists but
        lacks every other field is told apart from one that does not exist. Cached item rows
        read with fewer fields are dropped.
        """
        users, items = self._user_fields, self._item_fields
        if plan.stored_user:
            users = tuple(dict.fromkeys((*(users or ()), *((plan.user_id,) if plan.user_id else ()), *plan.stored_user)))
        if plan.stored_item:
            items = tuple(dict.fromkeys((*(items or ()), *((plan.item_id,) if plan.item_id else ()), *plan.stored_item)))
        if self._item_fields is not None and set(items or ()) - set(self._item_fields):
            self._rows.clear()
        self._user_fields, self._item_fields = users or (), items or ()
        self._needs = {"user": plan.stored_user + self._needs.get("user", ()), "item": plan.stored_item + self._needs.get("item", ())}

    async def fetch(self, user_id: str, item_ids: Sequence[str]) -> Fetched:
        now = time.monotonic()
        cache = self._rows
        slots = cache.lookup(item_ids, now)
        rows = cache.rows_at(slots)
        gens = cache.gen[slots]
        todo = np.flatnonzero(slots < 0).tolist()
        ufields, ifields = self._user_fields, self._item_fields
        read_user = ufields is None or bool(ufields)
        read_items = bool(todo) and (ifields is None or bool(ifields))
        user: Row | None = {}  # not read: no served model reads a stored user field
        new_rows: list[Row | None] = [{} for _ in todo]  # likewise for items
        if read_user or read_items:
            commands: list[tuple[str, ...]] = []
            if read_user:
                ukey = entity_key(self.prefix, "user", user_id)
                commands.append(("HGETALL", ukey) if ufields is None else ("HMGET", ukey, *ufields))
            if read_items:
                for i in todo:
                    k = entity_key(self.prefix, "item", item_ids[i])
                    commands.append(("HGETALL", k) if ifields is None else ("HMGET", k, *ifields))
            try:
                replies = await self._round_trip(commands)
            except Exception as exc:  # any store failure degrades; the reason is counted
                return Fetched(None, FetchedItems(rows, cache, slots, gens), degraded=True, reason=type(exc).__name__,
                               cache_hits=len(item_ids) - len(todo), cache_misses=len(todo))
            if read_user:
                user = _row(ufields, replies[0])
                replies = replies[1:]
            if read_items:
                new_rows = [_row(ifields, r) for r in replies]
        if todo:
            slots[todo], gens[todo] = cache.put([item_ids[i] for i in todo], new_rows, now)
            for i, row in zip(todo, new_rows):
                rows[i] = row
        fetched = Fetched(user, FetchedItems(rows, cache, slots, gens), cache_hits=len(item_ids) - len(todo), cache_misses=len(todo))
        return _judge_missing(fetched, self.missing_share)

    async def _round_trip(self, commands: list[tuple[str, ...]]) -> list[Any]:
        """Send the commands in one write and read their replies, under a ReplyDeadline.

        The connection is taken from the pool (and connected, if new) before the deadline
        starts: a connect takes several passes of a busy loop, which is not Redis's time.
        Redis Cluster goes through its pipeline, which splits the commands by node.
        """
        if self.kind == "redis_cluster":
            async with ReplyDeadline(self.timeout_s, self._lag):
                pipe = self._client.pipeline(transaction=False)
                for c in commands:
                    pipe.execute_command(*c)
                return await pipe.execute()
        pool = self._client.connection_pool
        conn = await pool.get_connection()
        try:
            async with ReplyDeadline(self.timeout_s, self._lag):
                await conn.send_packed_command(conn.pack_commands(commands), check_health=False)
                return [await conn.read_response(timeout=math.inf) for _ in commands]
        except BaseException:
            await conn.disconnect(nowait=True)  # a half-read reply must not reach the next request
            raise
        finally:
            await pool.release(conn)

    async def check(self, max_age_s: float = 1.0) -> FeatureCheck:
        """Compare Redis with the manifests `ctr features load` wrote (cached for `max_age_s`).

        Entities checked: those the served models read stored fields from (both before
        `use_fields`). Not ok when a manifest is missing (unless `require_manifest` is off),
        names no rows, lacks a field a model reads, or any sampled id lost its row.
        """
        last = self._last_check
        if last is not None and time.time() - last.checked_at < max_age_s:
            return last
        needs: dict[str, tuple[str, ...] | None] = {e: self._needs.get(e) if self._item_fields is not None else None for e in ENTITIES}
        wanted = [e for e in ENTITIES if needs[e] is None or needs[e]]
        try:
            async with asyncio.timeout(max(self.timeout_s * 4, 0.5)):
                cluster = self.kind == "redis_cluster"  # keys of many slots: no multi-key commands
                mget = self._client.mget_nonatomic if cluster else self._client.mget
                raw = await mget([manifest_key(self.prefix, e) for e in wanted]) if wanted else []
                manifests = {e: (Manifest.from_json(t) if t else None) for e, t in zip(wanted, raw)}
                pipe = self._client.pipeline(transaction=False)
                probes = [(e, entity_key(self.prefix, e, i)) for e, m in manifests.items() if m for i in m.sample]
                if cluster:
                    for _, key in probes:
                        pipe.exists(key)
                else:
                    for e in dict.fromkeys(e for e, _ in probes):
                        pipe.exists(*(k for e2, k in probes if e2 == e))
                counts = await pipe.execute() if probes else []
                found: dict[str, int] = {}
                for e, n in zip([e for e, _ in probes] if cluster else list(dict.fromkeys(e for e, _ in probes)), counts):
                    found[e] = found.get(e, 0) + int(n)
        except Exception as exc:
            result = FeatureCheck(ok=False, store=self.kind, reason=f"store_error:{type(exc).__name__}")
        else:
            entities = {e: judge(e, m, needs[e], found.get(e, 0), self.require_manifest) for e, m in manifests.items()}
            bad = [f"{e}:{c.reason}" for e, c in entities.items() if not c.ok]
            result = FeatureCheck(ok=not bad, store=self.kind, entities=entities, reason=";".join(bad) or None)
        if not result.ok and (last is None or last.ok or last.reason != result.reason):
            log.warning("feature_data_not_ok %s", kv(store=self.kind, prefix=self.prefix, reason=result.reason))
        self._last_check = result
        return result

    async def ping(self) -> bool:
        try:
            return bool(await asyncio.wait_for(self._client.ping(), timeout=max(self.timeout_s * 4, 0.2)))
        except Exception:
            return False

    async def close(self) -> None:
        self._lag.stop()
        try:
            await self._client.aclose()
        except Exception:  # closing a dead connection must not block shutdown
            pass


def build_store(cfg: "Any") -> FeatureStore:
    """Redis when a URL is configured, else the embedded store from the configured tables."""
    share = getattr(cfg, "missing_share_degraded", 0.5)
    if cfg.redis_url:
        return RedisFeatureStore(cfg.redis_url, cfg.prefix, cfg.timeout_s, cfg.cache_items, cfg.cache_ttl_s,
                                 missing_share=share, require_manifest=getattr(cfg, "require_manifest", True))
    return InMemoryFeatureStore.from_tables(cfg.users_table, cfg.items_table, share)


def feature_data_check(store: FeatureStore, metrics: Any = None) -> Callable[[], Awaitable[bool]]:
    """A readiness check (`Service.checks["features"]`): the feature data the manifest names is
    all there. Each run also sets `ctr_feature_manifest_ok` and `ctr_feature_rows{entity}` when
    `metrics` is given; `store.check()`'s FeatureCheck has the details (per-entity rows, fields,
    fingerprint, load time). It reads Redis at most once a second however often it is probed."""

    async def features() -> bool:
        check = await store.check()
        if metrics is not None:
            metrics.feature_manifest_ok.set(1 if check.ok else 0)
            for entity, e in check.entities.items():
                metrics.feature_rows.labels(entity).set(e.rows)
        return check.ok

    return features


def _redis_value(v: Any) -> str | int | float:
    """Redis stores strings; floats keep their repr so numeric buckets match the table's."""
    if isinstance(v, bool) or not isinstance(v, (str, int, float)):
        return str(v)
    return v


def bulk_load(
    table: str | Path, entity: str, url: str, prefix: str = "ctr", ttl_s: int = 0, chunk: int = 2000
) -> dict[str, Any]:
    """Write a users/items table into Redis hashes with pipelining, then its manifest.

    One HSET (+EXPIRE) per row, sent `chunk` rows per round trip: the network, not Redis,
    is the bottleneck of a bulk load, so the round-trip count is what matters. The manifest
    (service/manifest.py) is written last, so it only names data that is all there, and
    expires with the rows.
    """
    import redis
    from redis.cluster import RedisCluster

    plain, cluster = _cluster_url(url)
    client = RedisCluster.from_url(plain) if cluster else redis.Redis.from_url(plain)
    rows = read_entity_table(table, entity)
    t0 = time.perf_counter()
    pipe = client.pipeline(transaction=False)
    n = 0
    fields: dict[str, None] = {}
    for entity_id, row in rows.items():
        key = entity_key(prefix, entity, entity_id)
        fields.update(dict.fromkeys(row))
        pipe.delete(key)
        pipe.hset(key, mapping={k: _redis_value(v) for k, v in row.items()})
        if ttl_s:
            pipe.expire(key, ttl_s)
        n += 1
        if n % chunk == 0:
            pipe.execute()
    pipe.execute()
    seconds = time.perf_counter() - t0
    manifest = Manifest(entity=entity, fields=list(fields), rows=n, fingerprint=file_sha256(table), loaded_at=time.time(),
                        source=Path(table).name, ttl_s=int(ttl_s), sample=spread_sample(list(rows)))
    client.set(manifest_key(prefix, entity), manifest.to_json(), ex=ttl_s or None)
    client.close()
    return {"rows": n, "seconds": seconds, "rows_per_s": n / max(seconds, 1e-9), "manifest": manifest}
