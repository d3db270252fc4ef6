"""The hot-path encoder gives exactly the tokens (and missing counts) of the general one."""

from __future__ import annotations

import numpy as np
import pandas as pd

from service.encoding import FastEncoder, Missing, RequestEncoder
from service.features import read_entity_table


def _cases(synth_dir):
    users = read_entity_table(synth_dir / "users.parquet", "user")
    items = read_entity_table(synth_dir / "items.parquet", "item")
    uids, iids = list(users), list(items)
    rng = np.random.default_rng(0)
    for k in range(40):
        user_id = uids[k % 7] if k % 5 else "nobody"
        ids = [iids[int(i)] for i in rng.integers(0, len(iids), int(rng.integers(1, 60)))]
        if k % 3 == 0:
            ids += ["ghost", 17]
        rows = [items.get(str(i)) for i in ids]
        if k % 4 == 1 and rows[0] is not None:  # a changed stored row is a new object
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


def test_fast_encoder_matches_general_encoder(synth_spec, synth_dir):
    base = RequestEncoder.for_spec(synth_spec)
    fast = FastEncoder(base)
    for _ in range(2):  # the second pass is served from the memo and the item arena
        for user_id, user, rows, ids, feats, ctx in _cases(synth_dir):
            m1, m2 = Missing(), Missing()
            want = base.encode(base.columns(user_id, user, rows, ids, feats, ctx, m1))
            got = fast.encode_request(user_id, user, rows, ids, feats, ctx, m2)
            np.testing.assert_array_equal(got, want)
            assert m1.counts == m2.counts


def test_fast_encoder_matches_offline_encoding_of_joined_rows(synth_spec, synth_dir):
    items = pd.read_parquet(synth_dir / "items.parquet")
    users = pd.read_parquet(synth_dir / "users.parquet")
    fast = FastEncoder(RequestEncoder.for_spec(synth_spec))
    table = read_entity_table(synth_dir / "items.parquet", "item")
    urow = users.iloc[4].to_dict()
    ids = list(items["item_id"].iloc[:30])
    got = fast.encode_request(urow["user_id"], urow, [table[i] for i in ids], ids, [None] * 30, {"device": "web", "hour": 7})
    joined = items.iloc[:30].assign(**urow, device="web", hour=7)
    np.testing.assert_array_equal(got, synth_spec.encode(joined, strict=False))


def test_item_arena_starts_over_when_full(synth_spec, synth_dir):
    base = RequestEncoder.for_spec(synth_spec)
    fast = FastEncoder(base)
    fast.MAX_ITEMS = 50
    fast._arena = fast._arena[:8]  # forces growth too
    for user_id, user, rows, ids, feats, ctx in _cases(synth_dir):
        want = base.encode(base.columns(user_id, user, rows, ids, feats, ctx))
        np.testing.assert_array_equal(fast.encode_request(user_id, user, rows, ids, feats, ctx), want)
    assert fast._used <= 50 + 62
