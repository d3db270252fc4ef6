"""The running service and the offline scorer agree to 1e-5 on the same raw rows."""

from __future__ import annotations

import httpx
import numpy as np
import pandas as pd
import pytest

from service.app import create_app
from service.testing import ServerThread, tiny_package
from tests.service_support import config, request_body


def _offline_rows(synth_dir, body):
    users = pd.read_parquet(synth_dir / "users.parquet").set_index("user_id")
    items = pd.read_parquet(synth_dir / "items.parquet").set_index("item_id")
    rows = []
    for it in body["items"]:
        row = {"user_id": body["user_id"], "item_id": it["item_id"], **users.loc[body["user_id"]].to_dict()}
        row.update(items.loc[it["item_id"]].to_dict())
        row.update(body["context"])
        rows.append(row)
    return rows


def test_service_matches_offline_scorer(synth_spec, synth_dir, tmp_path):
    offline = pytest.importorskip("export.offline_scorer", reason="export.offline_scorer not built yet")
    from export.package import verify_package

    path, _ = tiny_package(tmp_path / "models", "synth", 1, synth_spec, seed=3)
    scorer = offline.OfflineScorer(verify_package(path))
    with ServerThread(create_app(config(tmp_path / "models", synth_dir))) as srv:
        for seed in range(3):
            body = request_body(synth_dir, n_items=64, user_index=seed, seed=seed)
            r = httpx.post(srv.url + "/score", json=body)
            assert r.status_code == 200
            want = np.asarray(scorer.score_rows(_offline_rows(synth_dir, body)), dtype=np.float64)
            np.testing.assert_allclose(r.json()["scores"], want, atol=1e-5)
