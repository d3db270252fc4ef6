"""POST /score end to end: real uvicorn on loopback, real onnxruntime, both feature stores."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest

from service.app import create_app
from service.features import bulk_load
from tests.testing import ServerThread
from tests.service_support import config, metric_value, offline_scores, request_body, trained_package  # noqa: F401


@pytest.fixture(scope="module")
def repo(trained_package):
    """A real tiny DGenCTR package; the reference scores come from the offline scorer."""
    from export.offline_scorer import OfflineScorer

    return trained_package.parent.parent, OfflineScorer(trained_package)


@pytest.fixture(scope="module")
def memory_server(repo, synth_dir):
    with ServerThread(create_app(config(repo[0], synth_dir))) as srv:
        yield srv


def test_happy_path_embedded_store(memory_server, repo, synth_dir, synth_spec):
    body = request_body(synth_dir, n_items=50, seed=1)
    r = httpx.post(memory_server.url + "/score", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["request_id"] == "r1" and out["model"] == "synth" and out["version"] == 1
    assert out["variant"] == "main" and out["degraded"] is False
    np.testing.assert_allclose(out["scores"], offline_scores(synth_spec, repo[1], synth_dir, body), atol=1e-5)


def test_happy_path_redis_store(repo, synth_dir, synth_spec, redis_url, redis_prefix):
    for entity in ("user", "item"):
        loaded = bulk_load(synth_dir / f"{entity}s.parquet", entity, redis_url, redis_prefix, ttl_s=600)
        assert loaded["rows"] > 0
    cfg = config(repo[0], features={"redis_url": redis_url, "prefix": redis_prefix, "timeout_s": 1.0})
    body = request_body(synth_dir, n_items=40, seed=2)
    body["items"].append({"item_id": "no-such-item"})
    with ServerThread(create_app(cfg)) as srv:
        r = httpx.post(srv.url + "/score", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["degraded"] is False
        np.testing.assert_allclose(r.json()["scores"], offline_scores(synth_spec, repo[1], synth_dir, body), atol=1e-5)
        r2 = httpx.post(srv.url + "/score", json=body)  # the second call is served from the item cache
        assert r2.json()["scores"] == r.json()["scores"]
        m = httpx.get(srv.url + "/metrics").text
        assert metric_value(m, "ctr_cache_hits_total") >= 40
        assert metric_value(m, "ctr_feature_missing_total", entity="item") == 2
        assert httpx.get(srv.url + "/readyz").status_code == 200


def test_request_features_override_stored_ones(memory_server, repo, synth_dir, synth_spec):
    body = request_body(synth_dir, n_items=5, seed=3)
    body["items"][0]["features"] = {"item_category": "c1", "item_price": 3.5}
    body["context"]["user_segment"] = "s2"
    r = httpx.post(memory_server.url + "/score", json=body)
    assert r.status_code == 200
    np.testing.assert_allclose(r.json()["scores"], offline_scores(synth_spec, repo[1], synth_dir, body), atol=1e-5)


def test_missing_entities_are_counted(memory_server, synth_dir):
    body = {"user_id": "nobody", "context": {}, "items": [{"item_id": "ghost1"}, {"item_id": 7}]}
    before = httpx.get(memory_server.url + "/metrics").text
    r = httpx.post(memory_server.url + "/score", json=body)
    assert r.status_code == 200 and len(r.json()["scores"]) == 2
    after = httpx.get(memory_server.url + "/metrics").text
    for entity, n in (("user", 1), ("item", 2), ("context_field", 2)):
        assert metric_value(after, "ctr_feature_missing_total", entity=entity) - metric_value(before, "ctr_feature_missing_total", entity=entity) == n


@pytest.mark.parametrize(
    "body, loc",
    [
        (b'{"user_id": "u1", "items": [', ["body", 28]),
        (b'{"items": [{"item_id": "i1"}]}', ["body", "user_id"]),
        (b'{"user_id": "u1", "items": []}', ["body", "items"]),
        (b'{"user_id": "u1", "items": [{"item_id": "i1", "features": {"x": [1]}}]}', ["body", "items", 0, "features", "x"]),
        (b'{"user_id": "u1", "items": [{}]}', ["body", "items", 0, "item_id"]),
        (b'{"user_id": "u1", "context": "ios", "items": [{"item_id": "i1"}]}', ["body", "context"]),
        (b'{"user_id": "u1", "items": [{"item_id": "i1"}], "extra": 1}', ["body", "extra"]),
    ],
)
def test_validation_errors_are_422_with_field_path(memory_server, body, loc):
    r = httpx.post(memory_server.url + "/score", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    locs = [d["loc"] for d in r.json()["detail"]]
    assert any(l[: len(loc)] == loc for l in locs) or (loc[1] == 28 and locs[0][0] == "body"), locs


def test_limits(repo, synth_dir):
    cfg = config(repo[0], synth_dir, limits={"max_items": 10, "max_body_bytes": 2048})
    with ServerThread(create_app(cfg)) as srv:
        r = httpx.post(srv.url + "/score", json={"user_id": "u1", "items": [{"item_id": f"i{i}"} for i in range(11)]})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "items"]
        r = httpx.post(srv.url + "/score", json={"user_id": "u1", "items": [{"item_id": "x" * 200}] * 10})
        assert r.status_code == 413


def test_unknown_variant_is_404(memory_server, synth_dir):
    body = request_body(synth_dir, n_items=2) | {"variant": "nope"}
    assert httpx.post(memory_server.url + "/score", json=body).status_code == 404


def test_admin_reload_needs_token(memory_server, monkeypatch):
    assert httpx.post(memory_server.url + "/admin/reload").status_code == 401
    monkeypatch.setenv("CTR_ADMIN_TOKEN", "s3cret")
    assert httpx.post(memory_server.url + "/admin/reload", headers={"Authorization": "Bearer wrong"}).status_code == 401
    r = httpx.post(memory_server.url + "/admin/reload", headers={"Authorization": "Bearer s3cret"})
    assert r.status_code == 200 and r.json()["results"][0]["result"] == "unchanged"


def test_health_metrics_and_docs(memory_server):
    assert httpx.get(memory_server.url + "/healthz").status_code == 200
    ready = httpx.get(memory_server.url + "/readyz")
    assert ready.status_code == 200 and ready.json()["models"][0]["provider"] == "CPUExecutionProvider"
    text = httpx.get(memory_server.url + "/metrics").text
    for name in ("ctr_request_seconds", "ctr_queue_seconds", "ctr_batch_rows", "ctr_inference_seconds", "ctr_feature_fetch_seconds", "ctr_model_info", "ctr_prediction"):
        assert name in text, name
    assert 'ctr_model_info{name="synth",provider="CPUExecutionProvider",variant="main",version="1"} 1.0' in text
    spec = httpx.get(memory_server.url + "/openapi.json").json()
    assert "ScoreRequest" in spec["components"]["schemas"] and "Item" in spec["components"]["schemas"]
    assert httpx.get(memory_server.url + "/docs").status_code == 200


def test_concurrent_requests_get_their_own_scores(memory_server, repo, synth_dir, synth_spec):
    from tests.service_support import fire

    bodies = [request_body(synth_dir, n_items=int(n), user_index=i % 50, seed=i) for i, n in enumerate(np.random.default_rng(5).integers(1, 120, 60))]
    responses = asyncio.run(fire(memory_server.url, bodies, concurrency=16))
    for b, r in zip(bodies, responses):
        assert r.status_code == 200
        assert r.json()["request_id"] == b["request_id"]
        np.testing.assert_allclose(r.json()["scores"], offline_scores(synth_spec, repo[1], synth_dir, b), atol=1e-5)
