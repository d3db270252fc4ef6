"""The service's request encoder gives exactly the tokens (and missing counts) of the plain
column-by-column encoding (tests/encoding_oracle.py), with its item token cache cold, warm,
invalidated, evicted or racing a concurrent refetch."""

from __future__ import annotations

import asyncio

import numpy as np
import pandas as pd

from model.readers import load_splits
from model.spec import FeatureSpec
from service.encoding import FieldPlan, Missing, RequestEncoder
from service.features import InMemoryFeatureStore, read_entity_table
from service.item_cache import FetchedItems, ItemRowCache
from tests import encoding_oracle as oracle


def _cases(synth_dir, n_cases=40, seed=0):
    users = read_entity_table(synth_dir / "users.parquet", "user")
    items = read_entity_table(synth_dir / "items.parquet", "item")
    uids, iids = list(users), list(items)
    rng = np.random.default_rng(seed)
    for k in range(n_cases):
        user_id = uids[k % 7] if k % 5 else "nobody"
        ids = [iids[int(i)] for i in rng.integers(0, len(iids), int(rng.integers(1, 60)))]
        if k % 3 == 0:
            ids += ["ghost", 17]
        rows = [items.get(str(i)) for i in ids]
        if k % 4 == 1 and rows[0] is not None:  # a changed stored row
            rows[0] = {**rows[0], "item_price": 9999.0}
            del rows[0]["item_brand"]
        user = users.get(user_id)
        if k % 6 == 2 and user is not None:
            user = {k2: v for k2, v in user.items() if k2 != "user_age"}
        ctx = {"device": "ios", "hour": int(k % 24)}
        if k % 7 == 3:
            ctx.pop("hour")
        if k % 8 == 4:
            ctx["item_category"] = "c3"  # a context value shadows the stored item value
            ctx["user_segment"] = "s1"
        feats = [None] * len(ids)
        if k % 9 == 5:
            feats[0] = {"item_price": 1.5, "hour": 3, "user_gender": "f"}
        yield user_id, user, rows, ids, feats, ctx


def _check(enc, spec, user_id, user, rows, ids, feats, ctx):
    m1, m2 = Missing(), Missing()
    want = oracle.encode(spec, user_id, user, list(rows), ids, feats, ctx, m1)
    got = enc.encode_request(user_id, user, rows, ids, feats, ctx, m2)
    np.testing.assert_array_equal(got, want)
    assert m1.counts == m2.counts


def _fetched(cache: ItemRowCache, ids, rows, now=0.0) -> FetchedItems:
    """Rows as a store hands them over: cached in slots, with the slots' generations."""
    keys = [str(i) for i in ids]
    slots = cache.lookup(keys, now)
    gens = cache.gen[slots]  # before the put, as the stores do: a put may evict a hit
    miss = np.flatnonzero(slots < 0)
    if len(miss):
        slots[miss], gens[miss] = cache.put([keys[i] for i in miss], [rows[i] for i in miss], now)
    return FetchedItems(rows, cache, slots, gens)


def test_encoder_matches_the_plain_encoding(synth_spec, synth_dir):
    enc = RequestEncoder.for_spec(synth_spec)
    for _ in range(2):  # the second pass is served from the memo
        for case in _cases(synth_dir):
            _check(enc, synth_spec, *case)


def test_encoder_matches_with_the_item_token_cache(synth_spec, synth_dir):
    """Rows read from slots: the first pass fills the token cache, the second gathers from it.
    A changed row (new object) is put again, so its slot's generation moves on."""
    enc = RequestEncoder.for_spec(synth_spec)
    cache = ItemRowCache(10_000, float("inf"))
    for _ in range(2):
        for user_id, user, rows, ids, feats, ctx in _cases(synth_dir):
            keys = [str(i) for i in ids]
            # A row that differs from the cached one is a refetch: put it (new generation).
            for k, r in zip(keys, rows):
                slot = cache.index.get(k)
                if slot is not None and cache.rows[slot] is not r:
                    cache.put([k], [r], 0.0)  # a refetch
            _check(enc, synth_spec, user_id, user, _fetched(cache, ids, rows), ids, feats, ctx)
    assert np.count_nonzero(enc.items.stamp >= 0) > 100  # rows really came from the cache


def test_random_requests_both_ways(synth_spec, synth_dir):
    """Random requests (ids as str and int, unknown ids, duplicates, overrides, shadowing
    context, absent fields) through the embedded store: equal tokens and counts."""
    users = read_entity_table(synth_dir / "users.parquet", "user")
    items = read_entity_table(synth_dir / "items.parquet", "item")
    store = InMemoryFeatureStore(users, items)
    enc = RequestEncoder.for_spec(synth_spec)
    rng = np.random.default_rng(7)
    iids, uids = list(items), list(users)
    values = {"device": ["ios", "web", None, 3], "hour": [0, 7, "7", 23.0, None], "item_category": ["c1", "c9"],
              "item_price": [0.5, "12.5", 1e9], "user_gender": ["f", "m", ""]}

    async def run():
        for _ in range(300):
            n = int(rng.integers(1, 40))
            ids = [iids[int(i)] if rng.random() < 0.9 else f"new{int(i)}" for i in rng.integers(0, len(iids), n)]
            ids = [int(i) if isinstance(i, str) and i.isdigit() and rng.random() < 0.3 else i for i in ids]
            user_id = uids[int(rng.integers(len(uids)))] if rng.random() < 0.8 else "anon"
            ctx = {k: v[int(rng.integers(len(v)))] for k, v in values.items() if k in ("device", "hour") and rng.random() < 0.8}
            if rng.random() < 0.1:
                ctx["item_category"] = "c2"
            feats = [None] * n
            for i in range(n):
                if rng.random() < 0.05:
                    feats[i] = {k: v[int(rng.integers(len(v)))] for k, v in values.items() if rng.random() < 0.5}
            f = await store.fetch(user_id, ids)
            _check(enc, synth_spec, user_id, f.user, f.items, ids, feats, ctx)

    asyncio.run(run())


def test_encoder_matches_offline_encoding_of_joined_rows(synth_spec, synth_dir):
    items = pd.read_parquet(synth_dir / "items.parquet")
    users = pd.read_parquet(synth_dir / "users.parquet")
    enc = RequestEncoder.for_spec(synth_spec)
    table = read_entity_table(synth_dir / "items.parquet", "item")
    urow = users.iloc[4].to_dict()
    ids = list(items["item_id"].iloc[:30])
    cache = ItemRowCache(100, float("inf"))
    for _ in range(2):
        got = enc.encode_request(urow["user_id"], urow, _fetched(cache, ids, [table[i] for i in ids]), ids, [None] * 30, {"device": "web", "hour": 7})
        joined = items.iloc[:30].assign(**urow, device="web", hour=7)
        np.testing.assert_array_equal(got, synth_spec.encode(joined, strict=False))


def test_a_new_model_version_does_not_reuse_the_old_tokens(synth_spec, synth_dir):
    """Reload: the new version's encoder has its own cache, although the store's slots (and
    their generations) are the same; its spec's vocabularies differ, so must its tokens."""
    train = load_splits(synth_dir, ("train",))["train"]
    other = FeatureSpec.load("synthetic").fit(train.iloc[: len(train) // 7])
    assert other.field("item_id").vocab != synth_spec.field("item_id").vocab
    table = read_entity_table(synth_dir / "items.parquet", "item")
    cache = ItemRowCache(1000, float("inf"))
    ids = list(table)[:50]
    rows = [table[i] for i in ids]
    old, new = RequestEncoder.for_spec(synth_spec), RequestEncoder.for_spec(other)
    for spec, enc in ((synth_spec, old), (other, new), (synth_spec, old), (other, new)):
        _check(enc, spec, "u1", None, _fetched(cache, ids, rows), ids, [None] * 50, {"device": "ios"})


def test_a_refetched_row_is_encoded_again(synth_spec, synth_dir):
    """After the TTL the store reads the row again: a new generation of the same slot."""
    table = read_entity_table(synth_dir / "items.parquet", "item")
    iid = next(iter(table))
    cache = ItemRowCache(10, ttl_s=5.0)
    enc = RequestEncoder.for_spec(synth_spec)
    first = enc.encode_request("u", None, _fetched(cache, [iid], [table[iid]], now=0.0), [iid], [None], {})
    changed = {**table[iid], "item_category": "c-new-" + str(table[iid]["item_category"]), "item_price": 1e6}
    assert cache.lookup([iid], 6.0)[0] < 0  # expired
    f = _fetched(cache, [iid], [changed], now=6.0)
    got = enc.encode_request("u", None, f, [iid], [None], {})
    np.testing.assert_array_equal(got, oracle.encode(synth_spec, "u", None, [changed], [iid], [None], {}))
    assert not np.array_equal(got, first)


def test_cache_is_bounded_and_eviction_keeps_tokens_right(synth_spec, synth_dir):
    table = read_entity_table(synth_dir / "items.parquet", "item")
    iids = list(table)
    cache = ItemRowCache(64, float("inf"))
    enc = RequestEncoder.for_spec(synth_spec)
    rng = np.random.default_rng(3)
    for _ in range(60):
        ids = [iids[int(i)] for i in rng.integers(0, len(iids), int(rng.integers(1, 100)))]
        rows = [table[i] for i in ids]
        _check(enc, synth_spec, "u", None, _fetched(cache, ids, rows), ids, [None] * len(ids), {"hour": 3})
        assert len(cache) <= 64
    assert len(enc.items.stamp) <= 65


def test_overrides_bypass_the_cache_for_their_rows(synth_spec, synth_dir):
    table = read_entity_table(synth_dir / "items.parquet", "item")
    ids = list(table)[:5]
    rows = [table[i] for i in ids]
    cache = ItemRowCache(10, float("inf"))
    enc = RequestEncoder.for_spec(synth_spec)
    feats = [None, {"item_category": "zzz", "item_price": 0.1}, None, None, None]
    _check(enc, synth_spec, "u", None, _fetched(cache, ids, rows), ids, feats, {})
    # The next request without overrides gets the stored values back, not the override's.
    _check(enc, synth_spec, "u", None, _fetched(cache, ids, rows), ids, [None] * 5, {})


def test_a_slot_taken_by_another_item_is_not_trusted(synth_spec, synth_dir):
    """Rows fetched, then (before encoding: e.g. a shadow variant) their slot is given to
    another item: the encoder encodes the row it holds instead of gathering the slot's tokens."""
    table = read_entity_table(synth_dir / "items.parquet", "item")
    a, b = list(table)[:2]
    cache = ItemRowCache(1, float("inf"))
    enc = RequestEncoder.for_spec(synth_spec)
    fa = _fetched(cache, [a], [table[a]])
    enc.encode_request("u", None, fa, [a], [None], {})
    fb = _fetched(cache, [b], [table[b]])  # evicts a: its slot now holds b
    enc.encode_request("u", None, fb, [b], [None], {})
    assert fa.valid_slots()[0] < 0
    _check(enc, synth_spec, "u", None, fa, [a], [None], {})


def test_field_plan_names_the_stored_fields(synth_spec):
    plan = FieldPlan.for_spec(synth_spec)
    assert plan.user_id == "user_id" and "user_id" not in plan.stored_user and "user_age" in plan.stored_user
    assert plan.item_id == "item_id" and set(plan.stored_item) == {"item_category", "item_brand", "item_price"}
    frappe = FeatureSpec.load("frappe_x1")
    assert FieldPlan.for_spec(frappe).stored_user == () and FieldPlan.for_spec(frappe).stored_item == ("cost",)


def test_integer_and_string_ids_are_one_item_in_the_row_cache():
    cache = ItemRowCache(4, float("inf"))
    slots, _ = cache.put([42, "7", "042", "x"], [{"a": 1}, {"a": 2}, {"a": 3}, {"a": 4}], 0.0)
    assert cache.lookup(["42", 42, 7, "7", "042", "x"], 0.0).tolist() == [slots[0], slots[0], slots[1], slots[1], slots[2], slots[3]]
    assert cache.lookup([42_0, "0042"], 0.0).tolist() == [-1, -1]
    cache.put(["y"], [None], 0.0)  # full: a sweep evicts, and the evicted id's alias goes with it
    assert len(cache) <= 4 and len(cache.index) == sum(1 for k in cache.keys if k is not None) + sum(
        1 for k in cache.keys if k is not None and k.isdigit() and str(int(k)) == k)
