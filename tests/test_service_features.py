"""Feature stores against a real Redis: only the served fields are read, in one round trip;
item rows expire and are encoded again; lost data is loud (missing share, manifest check);
and the fetch deadline counts Redis's time, not the event loop's."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import redis

from service.encoding import FieldPlan, Missing, RequestEncoder
from service.features import MISSING_FEATURES, InMemoryFeatureStore, RedisFeatureStore, bulk_load, feature_data_check, read_entity_table
from service.manifest import file_sha256, manifest_key
from tests import encoding_oracle as oracle
from tests.conftest import REPO


def _load(url, synth_dir, prefix="t", tables=None):
    for entity in ("user", "item"):
        bulk_load((tables or {}).get(entity, synth_dir / f"{entity}s.parquet"), entity, url, prefix)


def _commands(client) -> dict[str, int]:
    stats = client.info("commandstats")
    return {k.removeprefix("cmdstat_"): v["calls"] for k, v in stats.items()}


def _ids(synth_dir, n, seed=0):
    items = list(read_entity_table(synth_dir / "items.parquet", "item"))
    rng = np.random.default_rng(seed)
    return [items[int(i)] for i in rng.choice(len(items), n, replace=False)]


def test_redis_reads_only_the_served_fields_in_one_round_trip(private_redis, synth_dir, synth_spec, tmp_path):
    items = pd.read_parquet(synth_dir / "items.parquet").assign(item_title=lambda d: "a long unused title " * 20)
    items.to_parquet(tmp_path / "items.parquet")
    _load(private_redis.url, synth_dir, tables={"item": tmp_path / "items.parquet"})
    client = redis.Redis.from_url(private_redis.url)
    store = RedisFeatureStore(private_redis.url, "t", timeout_s=1.0)
    store.use_fields(FieldPlan.for_spec(synth_spec))
    users = read_entity_table(synth_dir / "users.parquet", "user")
    full_items = read_entity_table(tmp_path / "items.parquet", "item")
    uid, ids = next(iter(users)), _ids(synth_dir, 50)
    enc = RequestEncoder.for_spec(synth_spec)

    async def run():
        client.config_resetstat()
        f = await store.fetch(uid, ids)
        cold = _commands(client)
        f2 = await store.fetch(uid, ids)
        warm = _commands(client)
        await store.close()
        return f, cold, f2, warm

    f, cold, f2, warm = asyncio.run(run())
    assert not f.degraded and f.cache_misses == 50 and f2.cache_hits == 50
    assert cold.get("hmget") == 51 and "hgetall" not in cold  # the user and each item, one pipeline
    assert warm["hmget"] == 52  # hot items: only the user is read
    assert set(f.items[0]) <= {"item_id", "item_category", "item_brand", "item_price"}
    assert all("item_title" not in r for r in f.items)
    # Fewer fields read, same tokens as encoding the whole stored rows.
    for fetched in (f, f2):
        got = enc.encode_request(uid, fetched.user, fetched.items, ids, [None] * 50, {"device": "ios"})
        want = oracle.encode(synth_spec, uid, users[uid], [full_items[i] for i in ids], ids, [None] * 50, {"device": "ios"})
        np.testing.assert_array_equal(got, want)


def test_an_entity_read_only_for_its_id_is_not_read(private_redis, synth_dir):
    """Frappe's users carry no field but their id: a request of cached items costs no Redis command."""
    _load(private_redis.url, synth_dir)
    client = redis.Redis.from_url(private_redis.url)
    store = RedisFeatureStore(private_redis.url, "t", timeout_s=1.0)
    store.use_fields(FieldPlan(("user_id",), ("item_id", "item_price"), ("hour",), "user_id", "item_id"))
    ids = _ids(synth_dir, 20)

    async def run():
        first = await store.fetch("some-user", ids)
        client.config_resetstat()
        second = await store.fetch("another-user", ids)
        await store.close()
        return first, second, _commands(client)

    first, second, stats = asyncio.run(run())
    assert first.user == {} and not first.degraded and all(set(r) == {"item_id", "item_price"} for r in first.items)
    assert second.cache_hits == 20 and stats.get("hmget", 0) == 0 and stats.get("hgetall", 0) == 0


def test_embedded_and_redis_stores_give_the_same_tokens(redis_url, redis_prefix, synth_dir, synth_spec):
    _load(redis_url, synth_dir, redis_prefix)
    mem = InMemoryFeatureStore.from_tables(synth_dir / "users.parquet", synth_dir / "items.parquet")
    red = RedisFeatureStore(redis_url, redis_prefix, timeout_s=1.0)
    red.use_fields(FieldPlan.for_spec(synth_spec))
    enc_mem, enc_red = RequestEncoder.for_spec(synth_spec), RequestEncoder.for_spec(synth_spec)
    users = list(read_entity_table(synth_dir / "users.parquet", "user"))

    async def run():
        for k in range(30):
            ids = _ids(synth_dir, 40, seed=k % 4) + ["ghost", 12345678]
            uid = users[k] if k % 5 else "nobody"
            ctx = {"device": "web", "hour": k % 24}
            m1, m2 = Missing(), Missing()
            a, b = await mem.fetch(uid, ids), await red.fetch(uid, ids)
            ta = enc_mem.encode_request(uid, a.user, a.items, ids, [None] * len(ids), ctx, m1)
            tb = enc_red.encode_request(uid, b.user, b.items, ids, [None] * len(ids), ctx, m2)
            np.testing.assert_array_equal(ta, tb)
            assert m1.counts == m2.counts and m1.counts["item"] == 2
        await red.close()

    asyncio.run(run())


def test_item_rows_expire_and_are_encoded_again(redis_url, redis_prefix, synth_dir, synth_spec):
    _load(redis_url, synth_dir, redis_prefix)
    store = RedisFeatureStore(redis_url, redis_prefix, timeout_s=1.0, cache_ttl_s=0.3)
    store.use_fields(FieldPlan.for_spec(synth_spec))
    enc = RequestEncoder.for_spec(synth_spec)
    iid = _ids(synth_dir, 1)[0]
    client = redis.Redis.from_url(redis_url, decode_responses=True)

    async def tokens():
        f = await store.fetch("u", [iid])
        return f, enc.encode_request("u", f.user, f.items, [iid], [None], {})

    async def run():
        f0, before = await tokens()
        client.hset(f"{redis_prefix}:item:{iid}", mapping={"item_category": "c-renamed", "item_price": "100000.0"})
        f1, cached = await tokens()
        await asyncio.sleep(0.4)
        f2, after = await tokens()
        await store.close()
        return f0, before, f1, cached, f2, after

    f0, before, f1, cached, f2, after = asyncio.run(run())
    assert f1.cache_hits == 1 and np.array_equal(cached, before)  # within the TTL: the cached row
    assert f2.cache_misses == 1 and f2.items[0]["item_category"] == "c-renamed"
    np.testing.assert_array_equal(after, oracle.encode(synth_spec, "u", None, [f2.items[0]], [iid], [None], {}))
    assert not np.array_equal(after, before)


def test_lost_feature_data_degrades_answers(private_redis, synth_dir):
    _load(private_redis.url, synth_dir)
    users = list(read_entity_table(synth_dir / "users.parquet", "user"))
    ids = _ids(synth_dir, 30)

    async def fetch(uid, item_ids):
        store = RedisFeatureStore(private_redis.url, "t", timeout_s=1.0)
        try:
            return await store.fetch(uid, item_ids)
        finally:
            await store.close()

    ok = asyncio.run(fetch(users[0], ids + ["ghost"]))
    assert not ok.degraded and ok.items.count(None) == 1
    redis.Redis.from_url(private_redis.url).flushdb()
    lost = asyncio.run(fetch(users[0], ids))
    assert lost.degraded and lost.reason == MISSING_FEATURES and not lost.store_failed
    assert len(lost.items) == 30 and lost.items.count(None) == 30


def test_missing_share_threshold_is_configurable(synth_dir):
    store = InMemoryFeatureStore.from_tables(synth_dir / "users.parquet", synth_dir / "items.parquet", missing_share=0.3)
    ids = _ids(synth_dir, 6)
    few = asyncio.run(store.fetch("nobody", ids[:5] + ["g1"]))  # 2 of 7 unknown
    many = asyncio.run(store.fetch("nobody", ids[:3] + ["g1", "g2"]))  # 3 of 6
    assert not few.degraded and many.degraded and many.reason == MISSING_FEATURES


def test_features_load_writes_a_manifest_that_the_store_checks(private_redis, synth_dir, synth_spec):
    for entity in ("user", "item"):
        table = synth_dir / f"{entity}s.parquet"
        out = subprocess.run([sys.executable, "-m", "ctr", "features", "load", "--table", str(table), "--entity", entity,
                              "--redis", private_redis.url, "--prefix", "t"], capture_output=True, text=True, cwd=REPO, timeout=300)
        assert out.returncode == 0, out.stderr
        assert f'"key": "t:manifest:{entity}"' in out.stdout and file_sha256(table) in out.stdout
    client = redis.Redis.from_url(private_redis.url, decode_responses=True)

    async def run():
        store = RedisFeatureStore(private_redis.url, "t", timeout_s=1.0)
        store.use_fields(FieldPlan.for_spec(synth_spec))
        good = await store.check(max_age_s=0)
        assert good.ok and good.entities["user"].rows == 800 and good.entities["item"].rows == 400
        assert good.entities["item"].fingerprint == file_sha256(synth_dir / "items.parquet")
        assert good.entities["user"].sample_found == good.entities["user"].sample_total == 32
        assert await feature_data_check(store)() and good.as_dict()["rows"] == 1200

        sampled = json.loads(client.get(manifest_key("t", "user")))["sample"][5]
        client.delete(f"t:user:{sampled}")  # an evicted or expired row
        lost = await store.check(max_age_s=0)
        assert not lost.ok and lost.reason == "user:rows_lost"
        assert not await feature_data_check(store)()

        needs_more = RedisFeatureStore(private_redis.url, "t", timeout_s=1.0)
        needs_more.use_fields(FieldPlan(("user_id",), ("item_id", "item_colour"), (), "user_id", "item_id"))
        assert (await needs_more.check(max_age_s=0)).reason == "item:fields_missing:item_colour"

        client.flushdb()
        flushed = await store.check(max_age_s=0)
        assert not flushed.ok and flushed.reason == "user:no_manifest;item:no_manifest"
        lenient = RedisFeatureStore(private_redis.url, "t", timeout_s=1.0, require_manifest=False)
        assert (await lenient.check(max_age_s=0)).ok
        private_redis.stop()
        down = await store.check(max_age_s=0)
        assert not down.ok and down.reason.startswith("store_error:")
        for s in (store, needs_more, lenient):
            await s.close()

    asyncio.run(run())


def test_empty_embedded_store_is_a_warning(caplog):
    with caplog.at_level(logging.INFO, logger="service.features"):
        store = InMemoryFeatureStore.from_tables(None, None)
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and "feature_store_empty" in r.getMessage()]
    assert warned
    check = asyncio.run(store.check())
    assert check.ok and check.rows == 0 and check.reason == "empty"


# ---------------------------------------------------------------- the fetch deadline
async def _saturated(fetch, workers=32, rounds=25, block_s=0.004):
    """Concurrent requests that each fetch, then hold the event loop for `block_s` (the CPU
    work of parsing and encoding): one loop pass runs many of them, so it lasts far longer
    than the 50 ms fetch timeout. Returns (results, the longest loop lag seen)."""
    loop = asyncio.get_running_loop()
    lags, results = [0.0], []

    async def probe():
        while True:
            t = loop.time()
            await asyncio.sleep(0.005)
            lags.append(loop.time() - t - 0.005)

    async def worker(k):
        for r in range(rounds):
            results.append(await fetch(k, r))
            time.sleep(block_s)

    p = asyncio.ensure_future(probe())
    await asyncio.gather(*(worker(k) for k in range(workers)))
    p.cancel()
    return results, max(lags)


def test_a_busy_loop_does_not_degrade_a_healthy_redis(private_redis, synth_dir, synth_spec):
    _load(private_redis.url, synth_dir)
    ids = _ids(synth_dir, 20)
    users = list(read_entity_table(synth_dir / "users.parquet", "user"))

    async def run():
        store = RedisFeatureStore(private_redis.url, "t", timeout_s=0.05, cache_items=0)  # every fetch reads Redis
        store.use_fields(FieldPlan.for_spec(synth_spec))

        async def fetch(k, r):
            f = await store.fetch(users[(k * 31 + r) % len(users)], ids)
            return f.reason if f.degraded else None

        out = await _saturated(fetch)
        # The same load with a plain timeout around the same pipeline: what the store used to do.
        client = store._client

        async def naive(k, r):
            try:
                async with asyncio.timeout(0.05):
                    pipe = client.pipeline(transaction=False)
                    for i in ids:
                        pipe.hmget(f"t:item:{i}", ["item_id", "item_price"])
                    await pipe.execute()
                return False
            except TimeoutError:
                return True

        naive_out = await _saturated(naive)
        await store.close()
        return out, naive_out

    (degraded, lag), (naive_degraded, naive_lag) = asyncio.run(run())
    assert lag > 0.05 and naive_lag > 0.05  # the loop really was slower than the timeout
    assert sum(naive_degraded) > 0.1 * len(naive_degraded)  # so a plain timeout fires on a healthy Redis
    failed = [r for r in degraded if r]
    assert len(failed) <= 0.001 * len(degraded), f"{len(failed)} of {len(degraded)} degraded: {failed}"


def test_a_frozen_redis_still_degrades_and_recovers(private_redis, synth_dir, synth_spec):
    _load(private_redis.url, synth_dir)
    ids = _ids(synth_dir, 10)

    async def run():
        store = RedisFeatureStore(private_redis.url, "t", timeout_s=0.05, cache_items=0)
        store.use_fields(FieldPlan.for_spec(synth_spec))
        assert not (await store.fetch("u1", ids)).degraded
        private_redis.proc.send_signal(signal.SIGSTOP)
        try:
            frozen = await store.fetch("u1", ids)
            # Under loop pressure too: the deadline waits out the lag, then fails.
            busy, _ = await _saturated(lambda k, r: store.fetch("u1", ids), workers=8, rounds=3)
        finally:
            private_redis.proc.send_signal(signal.SIGCONT)
        deadline = time.monotonic() + 1.0
        while (back := await store.fetch("u1", ids)).degraded and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        await store.close()
        return frozen, busy, back

    frozen, busy, back = asyncio.run(run())
    assert frozen.degraded and frozen.reason == "TimeoutError" and frozen.store_failed
    assert all(f.degraded and f.reason == "TimeoutError" for f in busy)
    assert not back.degraded


def test_a_flushed_store_is_unready_and_its_answers_degraded(private_redis, synth_dir, synth_spec, tmp_path):
    """End to end (real uvicorn, onnxruntime, Redis): FLUSHDB under a running service makes
    /readyz 503 at once and the answers degraded (reason missing_features), still 200; a
    reload of the tables brings both back."""
    import httpx

    from service.app import create_app
    from tests.service_support import config, metric_value, request_body
    from tests.testing import ServerThread, tiny_package

    tiny_package(tmp_path / "models", "synth", 1, synth_spec)
    _load(private_redis.url, synth_dir)
    cfg = config(tmp_path / "models", features={"redis_url": private_redis.url, "prefix": "t", "timeout_s": 1.0, "cache_ttl_s": 0.2})
    body = request_body(synth_dir, n_items=20, seed=5)
    with ServerThread(create_app(cfg)) as srv:
        assert httpx.get(srv.url + "/readyz").status_code == 200
        m = httpx.get(srv.url + "/metrics").text
        assert metric_value(m, "ctr_feature_manifest_ok") == 1 and metric_value(m, "ctr_feature_rows", entity="item") == 400
        r = httpx.post(srv.url + "/score", json=body)
        assert r.status_code == 200 and r.json()["degraded"] is False
        redis.Redis.from_url(private_redis.url).flushdb()
        time.sleep(1.1)  # the manifest check reads Redis at most once a second; the item rows' TTL passes too
        ready = httpx.get(srv.url + "/readyz")
        assert ready.status_code == 503 and ready.json()["features"] is False
        assert metric_value(httpx.get(srv.url + "/metrics").text, "ctr_feature_manifest_ok") == 0
        r = httpx.post(srv.url + "/score", json=body)
        assert r.status_code == 200 and r.json()["degraded"] is True
        assert metric_value(httpx.get(srv.url + "/metrics").text, "ctr_degraded_total", reason="missing_features") >= 1
        _load(private_redis.url, synth_dir)
        time.sleep(1.1)
        assert httpx.get(srv.url + "/readyz").status_code == 200
        assert httpx.post(srv.url + "/score", json=body).json()["degraded"] is False
