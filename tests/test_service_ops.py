"""Operations: Redis outage, overload, hot reload under load, corrupt packages, A/B, drain."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest

from service.ab import Assigner
from service.app import create_app
from service.features import bulk_load
from tests.testing import ServerThread, free_port, tiny_package
from tests.service_support import REPO_ROOT, config, fire, metric_value, offline_scores, request_body, wait_ready


def tiny_package_weights(spec, seed):
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        return tiny_package(d, "x", 1, spec, seed=seed)[1]


@pytest.fixture()
def repo(synth_spec, tmp_path):
    _, weights = tiny_package(tmp_path / "models", "synth", 1, synth_spec, seed=1)
    return tmp_path / "models", weights


def test_redis_down_then_up_degrades_and_recovers(repo, synth_dir, synth_spec, private_redis):
    def load():
        for entity in ("user", "item"):
            bulk_load(synth_dir / f"{entity}s.parquet", entity, private_redis.url, "t")

    load()
    cfg = config(repo[0], features={"redis_url": private_redis.url, "prefix": "t", "timeout_s": 0.2, "cache_items": 0})
    body = request_body(synth_dir, n_items=10, seed=4)
    expected = offline_scores(synth_spec, repo[1], synth_dir, body)
    with ServerThread(create_app(cfg)) as srv:
        r = httpx.post(srv.url + "/score", json=body)
        assert r.status_code == 200 and r.json()["degraded"] is False
        private_redis.stop()
        r = httpx.post(srv.url + "/score", json=body, timeout=10)
        assert r.status_code == 200 and r.json()["degraded"] is True
        assert len(r.json()["scores"]) == 10
        assert httpx.get(srv.url + "/readyz", timeout=10).status_code == 503
        assert httpx.get(srv.url + "/healthz").status_code == 200
        private_redis.start()
        load()
        deadline = time.monotonic() + 20
        while True:  # the client reconnects by itself; no restart, no admin call
            r = httpx.post(srv.url + "/score", json=body, timeout=10)
            if not r.json()["degraded"] or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert r.json()["degraded"] is False
        np.testing.assert_allclose(r.json()["scores"], expected, atol=1e-6)
        while httpx.get(srv.url + "/readyz").status_code != 200:  # the readiness checks run at most once a second
            assert time.monotonic() < deadline + 5
            time.sleep(0.2)
        assert metric_value(httpx.get(srv.url + "/metrics").text, "ctr_degraded_total") >= 1


def test_redis_down_can_be_configured_to_refuse(repo, synth_dir, private_redis):
    cfg = config(repo[0], features={"redis_url": private_redis.url, "on_store_error": "reject", "timeout_s": 0.2})
    with ServerThread(create_app(cfg)) as srv:
        private_redis.stop()
        r = httpx.post(srv.url + "/score", json=request_body(synth_dir, 3), timeout=10)
        assert r.status_code == 503 and r.headers["retry-after"]


def test_overload_gives_fast_503_and_accepted_requests_succeed(repo, synth_dir, synth_spec):
    # A tiny queue and a long batching window: most of a burst cannot be accepted.
    cfg = config(repo[0], synth_dir, batcher={"max_batch_rows": 512, "max_queue_delay_ms": 50, "max_queue_rows": 300})
    bodies = [request_body(synth_dir, n_items=100, user_index=i, seed=i) for i in range(40)]
    with ServerThread(create_app(cfg)) as srv:
        responses = asyncio.run(fire(srv.url, bodies, concurrency=40))
        codes = [r.status_code for r in responses]
        assert set(codes) <= {200, 503} and codes.count(200) >= 2 and codes.count(503) >= 1
        for b, r in zip(bodies, responses):
            if r.status_code == 503:
                assert r.headers["retry-after"] == "1"
            else:
                np.testing.assert_allclose(r.json()["scores"], offline_scores(synth_spec, repo[1], synth_dir, b), atol=1e-6)
        m = httpx.get(srv.url + "/metrics").text
        # Refused by admission control (before parsing) or by the batcher's queue bound.
        assert metric_value(m, "ctr_rejected_total") == codes.count(503)
        assert metric_value(m, "ctr_request_items_count") == codes.count(200) + metric_value(m, "ctr_rejected_total", reason="queue_full")


def test_deadline_in_queue_gives_503(repo, synth_dir):
    cfg = config(repo[0], synth_dir, batcher={"max_queue_delay_ms": 200, "timeout_ms": 1})
    with ServerThread(create_app(cfg)) as srv:
        r = httpx.post(srv.url + "/score", json=request_body(synth_dir, 5))
        assert r.status_code == 503 and "deadline" in r.json()["detail"]


def test_hot_reload_under_load_and_corrupt_version(repo, synth_dir, synth_spec, monkeypatch):
    monkeypatch.setenv("CTR_ADMIN_TOKEN", "tok")
    root = repo[0]
    auth = {"Authorization": "Bearer tok"}
    bodies = [request_body(synth_dir, n_items=30, user_index=i % 40, seed=i) for i in range(300)]
    with ServerThread(create_app(config(root, synth_dir))) as srv:

        async def load_and_reload():
            async def reload_midway():
                await asyncio.sleep(0.3)
                await asyncio.to_thread(tiny_package, root, "synth", 2, synth_spec, 2)
                async with httpx.AsyncClient() as c:
                    return await c.post(srv.url + "/admin/reload", headers=auth, timeout=60)

            return await asyncio.gather(fire(srv.url, bodies, concurrency=8), reload_midway())

        responses, reload = asyncio.run(load_and_reload())
        assert reload.status_code == 200 and reload.json()["results"][0]["version"] == 2
        assert all(r.status_code == 200 for r in responses), [r.status_code for r in responses if r.status_code != 200]
        versions = [r.json()["version"] for r in responses]
        assert versions[0] == 1 and versions[-1] == 2
        weights = {1: repo[1], 2: tiny_package_weights(synth_spec, 2)}
        for b, r in zip(bodies[::10], responses[::10]):  # each answer matches the version it names
            want = offline_scores(synth_spec, weights[r.json()["version"]], synth_dir, b)
            np.testing.assert_allclose(r.json()["scores"], want, atol=1e-6)

        # A corrupt version 3 is refused; version 2 keeps serving.
        bad = root / "synth" / "3"
        (root / "synth" / "2").rename(root / "synth" / "tmp")
        import shutil

        shutil.copytree(root / "synth" / "tmp", bad)
        (root / "synth" / "tmp").rename(root / "synth" / "2")
        (bad / "model.onnx").write_bytes(b"\x08\x07garbage" * 100)
        r = httpx.post(srv.url + "/admin/reload", headers=auth, timeout=60)
        assert r.status_code == 409 and r.json()["results"][0]["result"] == "failed"
        r = httpx.post(srv.url + "/score", json=bodies[0])
        assert r.status_code == 200 and r.json()["version"] == 2
        m = httpx.get(srv.url + "/metrics").text
        assert metric_value(m, "ctr_reload_total", result="failed") == 1
        assert metric_value(m, "ctr_model_info", version="2") == 1 and metric_value(m, "ctr_model_info", version="1") == 0


def test_polling_picks_up_a_new_version(repo, synth_dir, synth_spec):
    cfg = config(repo[0], synth_dir, reload_poll_s=0.2)
    with ServerThread(create_app(cfg)) as srv:
        tiny_package(repo[0], "synth", 2, synth_spec, seed=2)
        deadline = time.monotonic() + 20
        while httpx.post(srv.url + "/score", json=request_body(synth_dir, 3)).json()["version"] != 2:
            assert time.monotonic() < deadline
            time.sleep(0.1)


def test_ab_assignment_is_stable_and_matches_weights():
    a = Assigner(["control", "treat", "small"], [0.5, 0.4, 0.1], salt="exp1")
    users = [f"u{i}" for i in range(10_000)]
    first = [a.assign(u) for u in users]
    assert first == [a.assign(u) for u in users]
    assert first == [Assigner(["control", "treat", "small"], [5, 4, 1], salt="exp1").assign(u) for u in users]
    for name, w in (("control", 0.5), ("treat", 0.4), ("small", 0.1)):
        assert abs(first.count(name) / len(users) - w) < 0.02
    other = [Assigner(["control", "treat", "small"], [0.5, 0.4, 0.1], salt="exp2").assign(u) for u in users]
    assert sum(x != y for x, y in zip(first, other)) > 3000  # a new salt reshuffles
    assert a.assign("u1", explicit="small") == "small"


def test_ab_variants_and_shadow_over_http(synth_spec, synth_dir, tmp_path):
    root = tmp_path / "models"
    tiny_package(root, "a", 1, synth_spec, seed=1)
    tiny_package(root, "b", 1, synth_spec, seed=2)
    cfg = config(
        root,
        synth_dir,
        variants=[{"name": "control", "model": "a", "weight": 1}, {"name": "treat", "model": "b", "weight": 1}],
        shadow={"name": "shadow", "model": "b"},
    )
    with ServerThread(create_app(cfg)) as srv:
        seen = {}
        for i in range(40):
            body = request_body(synth_dir, 3, user_index=i, seed=i)
            seen.setdefault(httpx.post(srv.url + "/score", json=body).json()["variant"], 0)
        assert set(seen) == {"control", "treat"}
        r = httpx.post(srv.url + "/score", json=request_body(synth_dir, 3) | {"variant": "treat"})
        assert r.json()["variant"] == "treat" and r.json()["model"] == "b"
        time.sleep(0.2)
        m = httpx.get(srv.url + "/metrics").text
        assert metric_value(m, "ctr_request_seconds_count", variant="treat", status="200") >= 1
        assert metric_value(m, "ctr_prediction_count", variant="shadow") >= 40


def test_sigterm_drains_without_dropping_accepted_requests(repo, synth_dir, tmp_path):
    port = free_port()
    cfg_path = tmp_path / "serve.json"
    import json

    cfg_path.write_text(json.dumps({"drain_grace_s": 1.0, "batcher": {"max_queue_delay_ms": 5}, "scorer": {"buckets": [1, 128], "intra_op_threads": 1, "warmup_runs": 1}}))
    cmd = [sys.executable, "-m", "ctr.cli", "serve", "--repo", str(repo[0]), "--config", str(cfg_path), "--port", str(port),
           "--users", str(synth_dir / "users.parquet"), "--items", str(synth_dir / "items.parquet")]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, url)

        async def traffic():
            results = []
            async with httpx.AsyncClient(base_url=url, timeout=30) as c:
                async def one(i):
                    try:
                        r = await c.post("/score", json=request_body(synth_dir, 50, seed=i))
                        results.append(r.status_code)
                    except httpx.TransportError:
                        results.append("refused")  # not accepted: the listener was already closed

                async def stream():
                    for i in range(200):
                        asyncio.ensure_future(one(i))
                        await asyncio.sleep(0.01)

                t = asyncio.ensure_future(stream())
                await asyncio.sleep(0.3)
                proc.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.3)
                ready = (await c.get("/readyz")).status_code  # draining: still answering, not ready
                await t
                for _ in range(300):
                    if len(results) == 200:
                        break
                    await asyncio.sleep(0.05)
            return results, ready

        results, ready = asyncio.run(traffic())
        assert ready == 503
        assert proc.wait(60) == 0
        assert all(r in (200, "refused") for r in results), results
        assert results.count(200) > 20
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_warmed_heap_is_frozen_and_gc_pauses_are_measured(repo, synth_dir, synth_spec, monkeypatch):
    """After warm-up the heap sits in the permanent generation (full collections skip it),
    a hot swap freezes the new version's objects too, collections are timed into
    ctr_gc_pause_seconds, and shutdown hands the heap back to the collector."""
    import gc

    monkeypatch.setenv("CTR_ADMIN_TOKEN", "tok")
    gc.unfreeze()
    cfg = config(repo[0], synth_dir)
    with ServerThread(create_app(cfg)) as srv:
        frozen = gc.get_freeze_count()
        assert frozen > 10_000
        tiny_package(repo[0], "synth", 2, synth_spec, seed=2)
        r = httpx.post(srv.url + "/admin/reload", headers={"Authorization": "Bearer tok"}, timeout=60)
        assert r.status_code == 200 and r.json()["results"][0]["result"] == "ok"
        assert gc.get_freeze_count() > frozen
        gc.collect()
        text = httpx.get(srv.url + "/metrics").text
        assert metric_value(text, "ctr_gc_pause_seconds_count", generation="2") >= 1
        assert httpx.post(srv.url + "/score", json=request_body(synth_dir, 3)).status_code == 200
    assert gc.get_freeze_count() == 0


def test_gc_freeze_can_be_turned_off(repo, synth_dir):
    import gc

    gc.unfreeze()
    cfg = config(repo[0], synth_dir).model_copy(update={"gc_freeze": False})
    with ServerThread(create_app(cfg)) as srv:
        assert gc.get_freeze_count() == 0
        assert httpx.get(srv.url + "/readyz").status_code == 200


def test_gil_switch_interval_is_set_while_serving_and_restored(repo, synth_dir):
    before = sys.getswitchinterval()
    cfg = config(repo[0], synth_dir).model_copy(update={"gil_switch_interval_ms": 0.5})
    with ServerThread(create_app(cfg)) as srv:
        assert sys.getswitchinterval() == pytest.approx(0.0005)
        assert httpx.post(srv.url + "/score", json=request_body(synth_dir, 3)).status_code == 200
    assert sys.getswitchinterval() == before
