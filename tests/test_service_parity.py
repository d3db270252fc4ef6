"""The running service and the offline scorer agree to 1e-5 on the same raw rows.

The model is a real (tiny) DGenCTR run exported by the exporter, so the parity covers the
whole path a production model takes: training spec -> package -> service encoding -> session.
"""

from __future__ import annotations

import httpx
import numpy as np

from export.offline_scorer import OfflineScorer
from export.package import verify_package
from service.app import create_app
from tests.testing import ServerThread
from tests.service_support import config, request_body, trained_package, offline_rows  # noqa: F401 (fixture)


def test_service_matches_offline_scorer_on_a_trained_package(trained_package, synth_dir):
    pkg = verify_package(trained_package)
    assert pkg.model_type == "dgenctr"
    scorer = OfflineScorer(pkg)
    repo = trained_package.parent.parent
    with ServerThread(create_app(config(repo, synth_dir))) as srv:
        bodies = [request_body(synth_dir, n_items=64, user_index=seed, seed=seed) for seed in range(3)]
        # Unknown entities and request-level overrides take the same path on both sides.
        bodies[1]["items"].append({"item_id": "no-such-item"})
        bodies[2]["items"][0]["features"] = {"item_price": 3.5, "item_category": "c1"}
        bodies[2]["user_id"] = "no-such-user"
        for body in bodies:
            r = httpx.post(srv.url + "/score", json=body)
            assert r.status_code == 200, r.text
            want = np.asarray(scorer.score_rows(offline_rows(synth_dir, body)), dtype=np.float64)
            np.testing.assert_allclose(r.json()["scores"], want, atol=1e-5, rtol=0)
            assert np.std(want) > 0  # a trained model, not a constant
