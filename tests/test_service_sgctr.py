"""SGCTR served per variant: real uvicorn, real onnxruntime, a tiny trained DGenCTR with a refinement graph.

One version serves as a plain and an SGCTR variant (an A/B test of SGCTR). The SGCTR variant
must answer in plain's shape, score exactly as `ctr evaluate --test-time sgctr` does (the
OfflineScorer encoding and `load_sgctr` graph of testtime/evaluate.py), run its R passes
inside its own batched refinement-graph calls, and count them; a variant asking for a graph
the package does not hold is refused at load and counted, never answered with a 5xx.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest

from export.offline_scorer import OfflineScorer
from service.app import create_app
from service.registry import NoServableModel
from service.test_time import SgctrPath
from tests.service_support import config, fire, metric_value, offline_rows, request_body, trained_package  # noqa: F401 (fixture)
from tests.test_sgctr_package import _ctr
from tests.testing import ServerThread
from testtime.sgctr import SGCTR_DIR, SGCTR_MANIFEST, SgctrConfig, load_sgctr

# Training the tiny model and exporting one refinement graph take a minute or two of CPU.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

SG1 = {"method": "sgctr", "passes": 1}
PARITY_ATOL = 1e-6


@pytest.fixture(scope="module")
def sgctr_repo(trained_package: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    """MODELS with synth/1: the trained package plus the refinement graph for passes=1 (defaults)."""
    run = trained_package.parent.parent.parent / "run"
    repo = tmp_path_factory.mktemp("sgsvc") / "models"
    dst = repo / "synth" / "1"
    shutil.copytree(trained_package, dst)
    _ctr("sgctr", "export", "--run", str(run), "--package", str(dst), "--passes", "1", "--generator-rows", "512")
    return repo


def _variants(**test_times: dict | None) -> list[dict]:
    return [{"name": name, "model": "synth", "test_time": tt} for name, tt in test_times.items()]


def _publish_without_graphs(repo: Path, version: int) -> None:
    """Version `version`: version 1's files (metadata renumbered), without the refinement graphs."""
    dst = repo / "synth" / str(version)
    shutil.copytree(repo / "synth" / "1", dst)
    shutil.rmtree(dst / SGCTR_DIR)
    (dst / SGCTR_MANIFEST).unlink()
    meta = json.loads((dst / "metadata.json").read_text())
    meta["version"] = version
    (dst / "metadata.json").write_text(json.dumps(meta))


def _offline_sgctr(package: Path, synth_dir: Path, body: dict, cfg: SgctrConfig) -> tuple[np.ndarray, np.ndarray]:
    """(plain, SGCTR) probabilities of the body's rows the way `ctr evaluate` computes them."""
    offline = OfflineScorer(package, intra_op_threads=1)
    tokens = offline.encode(pd.DataFrame(offline_rows(synth_dir, body)))
    return offline.score_tokens(tokens), load_sgctr(package, cfg, threads=1).score(tokens)


def test_sgctr_variant_answers_in_plain_shape_with_the_offline_scores(sgctr_repo: Path, synth_dir: Path):
    package = sgctr_repo / "synth" / "1"
    app = create_app(config(sgctr_repo, synth_dir, variants=_variants(sg=SG1)))
    bodies = [request_body(synth_dir, n_items=n, user_index=s, seed=s) for s, n in ((0, 1), (1, 37), (2, 64))]
    with ServerThread(app) as srv:
        for body in bodies:
            r = httpx.post(srv.url + "/score", json=body)
            assert r.status_code == 200, r.text
            doc = r.json()
            assert sorted(doc) == ["degraded", "model", "request_id", "scores", "variant", "version"]
            assert doc["variant"] == "sg" and doc["version"] == 1 and len(doc["scores"]) == len(body["items"])
            plain, want = _offline_sgctr(package, synth_dir, body, SgctrConfig(**SG1))
            np.testing.assert_allclose(doc["scores"], want, atol=PARITY_ATOL, rtol=0)
            if len(body["items"]) > 1:  # the refinement moved the scores, so parity is not plain's
                assert np.abs(np.asarray(doc["scores"]) - plain).max() > 10 * PARITY_ATOL


def test_plain_and_sgctr_variants_of_one_version_side_by_side(sgctr_repo: Path, synth_dir: Path):
    app = create_app(config(sgctr_repo, synth_dir, variants=_variants(plain=None, sg=SG1)))
    bodies = [request_body(synth_dir, n_items=48, user_index=s, seed=s) for s in range(3)]
    rows = sum(len(b["items"]) for b in bodies)
    with ServerThread(app) as srv:
        registry = app.state.service.registry
        plain, sg = registry.models["plain"], registry.models["sg"]
        # One version: the plain session is shared; the SGCTR variant's batcher runs its own graph.
        assert sg.scorer is plain.scorer and sg.batcher is not plain.batcher
        assert isinstance(sg.test_time, SgctrPath) and sg.test_time.runner is not plain.scorer
        assert sg.batcher.score_fn == sg.test_time.runner.score and plain.batcher.score_fn == plain.scorer.score
        described = {d["variant"]: d for d in httpx.get(srv.url + "/models").json()["models"]}
        assert described["plain"]["test_time"] is None
        tt = described["sg"]["test_time"]
        assert tt["method"] == "sgctr" and tt["passes"] == 1 and tt["score"] == "sweep" and tt["runs_per_row"] == 3
        assert tt["graph"].startswith(f"{SGCTR_DIR}/") and tt["graph"].endswith("-r1.onnx")

        answers: dict[str, list[np.ndarray]] = {"plain": [], "sg": []}
        for body in bodies:
            for variant in answers:
                r = httpx.post(srv.url + "/score", json={**body, "variant": variant})
                assert r.status_code == 200, r.text
                assert r.json()["variant"] == variant and len(r.json()["scores"]) == len(body["items"])
                answers[variant].append(np.asarray(r.json()["scores"]))
        p, s = np.concatenate(answers["plain"]), np.concatenate(answers["sg"])
        assert np.abs(s - p).max() > 1e-4  # the refinement graph ran, not model.onnx

        # Concurrent requests share the variant's batches; a row's score does not depend on its batch mates.
        many = asyncio.run(fire(srv.url, [{**b, "variant": "sg"} for b in bodies] * 4, concurrency=12))
        for i, r in enumerate(many):
            assert r.status_code == 200, r.text
            np.testing.assert_allclose(r.json()["scores"], answers["sg"][i % len(bodies)], atol=PARITY_ATOL, rtol=0)
        text = httpx.get(srv.url + "/metrics").text
    n_sg = rows + len(many) * 48
    assert metric_value(text, "ctr_test_time_rows_total", variant="sg", method="sgctr") == n_sg
    # R=1, sweep over 2 field groups: 1 * 2 + 1 = 3 denoiser runs per row, all inside the graph.
    assert metric_value(text, "ctr_test_time_model_passes_total", variant="sg", method="sgctr") == 3 * n_sg
    assert metric_value(text, "ctr_batch_rows_sum", variant="sg") == n_sg  # no extra batch rows, no loop per pass
    assert metric_value(text, "ctr_batch_rows_sum", variant="plain") == rows
    assert metric_value(text, "ctr_test_time_rows_total", variant="plain") == 0
    assert metric_value(text, "ctr_test_time_model_passes_total", variant="plain") == 0


def test_a_variant_asking_for_graphs_not_exported_is_refused_and_counted(sgctr_repo: Path, synth_dir: Path, tmp_path: Path,
                                                                        caplog: pytest.LogCaptureFixture,
                                                                        monkeypatch: pytest.MonkeyPatch):
    repo = tmp_path / "models"
    shutil.copytree(sgctr_repo / "synth" / "1", repo / "synth" / "1")
    _publish_without_graphs(repo, 2)

    # Pinned to passes=2 of version 1, which holds only R=1: the process does not start, and says why.
    with pytest.raises(NoServableModel, match=r"pinned version 1 .* cannot be served: 1 \(test_time\)"):
        create_app(config(repo, synth_dir, variants=[{"name": "sg", "model": "synth", "version": 1,
                                                      "test_time": {"method": "sgctr", "passes": 2}}]))
    assert "no refinement graph for passes=2" in caplog.text
    assert f"ctr sgctr export --run RUN_DIR --package {repo / 'synth' / '1'} --passes 2" in caplog.text
    # A batch-dependent blend would make a row's score depend on other requests: refused too.
    with pytest.raises(NoServableModel, match=r"cannot be served: 1 \(test_time\)"):
        create_app(config(repo, synth_dir, variants=[{"name": "sg", "model": "synth", "version": 1,
                                                      "test_time": {**SG1, "weight": "batch"}}]))
    assert "weight=batch" in caplog.text

    # "latest": plain serves version 2; SGCTR skips it (counted, named in a WARNING) and serves version 1.
    caplog.clear()
    monkeypatch.setenv("CTR_ADMIN_TOKEN", "t0ken")
    app = create_app(config(repo, synth_dir, variants=_variants(plain=None, sg=SG1)))
    assert "model_version_skipped" in caplog.text and "ctr sgctr export --run RUN_DIR" in caplog.text
    with ServerThread(app) as srv:
        body = request_body(synth_dir, n_items=8)
        for variant, version in (("plain", 2), ("sg", 1)):
            r = httpx.post(srv.url + "/score", json={**body, "variant": variant})
            assert r.status_code == 200 and r.json()["version"] == version, r.text
        # An explicit reload to the version without the graph fails (409) and version 1 keeps serving.
        r = httpx.post(srv.url + "/admin/reload", headers={"Authorization": "Bearer t0ken"}, json={"variant": "sg"})
        assert r.status_code == 409 and "no sgctr.json" in r.json()["results"][0]["error"], r.text
        r = httpx.post(srv.url + "/score", json={**body, "variant": "sg"})
        assert r.status_code == 200 and r.json()["version"] == 1, r.text
        text = httpx.get(srv.url + "/metrics").text
    assert metric_value(text, "ctr_model_load_failures_total", variant="sg", reason="test_time") == 2
    assert metric_value(text, "ctr_model_load_failures_total", variant="plain") == 0
    assert metric_value(text, "ctr_test_time_rows_total", variant="sg", method="sgctr") == 16


def test_the_sgctr_setting_from_the_environment_and_its_typos(monkeypatch: pytest.MonkeyPatch):
    from service.config import SettingsError, load_settings
    from testtime.matt import TestTimeConfig

    monkeypatch.setenv("CTR_VARIANTS", '[{"name":"sg","model":"m","test_time":{"method":"sgctr","passes":1}}]')
    assert load_settings().variants[0].test_time == SgctrConfig(passes=1)
    monkeypatch.setenv("CTR_VARIANTS", '[{"name":"sg","model":"m","test_time":{"method":"sgctr","passes":2,"score":"rotate","groups":4}}]')
    assert load_settings().variants[0].test_time == SgctrConfig(passes=2, score="rotate", groups=4)
    # No method is still MATT, as before SGCTR existed.
    monkeypatch.setenv("CTR_VARIANTS", '[{"name":"m","model":"m","test_time":{"paths":2}}]')
    assert load_settings().variants[0].test_time == TestTimeConfig(paths=2)

    # A typo under an SGCTR block names SGCTR's keys, under the key path as written.
    monkeypatch.setenv("CTR_VARIANTS", '[{"name":"sg","model":"m","test_time":{"method":"sgctr","pases":1}}]')
    with pytest.raises(SettingsError, match=r"unknown key 'variants\.0\.test_time\.pases' \(valid keys under 'variants\.0\.test_time': method, passes, score, groups"):
        load_settings()
    # A MATT key is not an SGCTR key.
    monkeypatch.setenv("CTR_VARIANTS", '[{"name":"sg","model":"m","test_time":{"method":"sgctr","paths":4}}]')
    with pytest.raises(SettingsError, match=r"unknown key 'variants\.0\.test_time\.paths'"):
        load_settings()
    monkeypatch.setenv("CTR_VARIANTS", '[{"name":"sg","model":"m","test_time":{"method":"sgctr","passes":4}}]')
    with pytest.raises(SettingsError, match=r"variants\.0\.test_time\.passes: Input should be less than or equal to 3"):
        load_settings()
    monkeypatch.setenv("CTR_VARIANTS", '[{"name":"sg","model":"m","test_time":{"method":"dgen"}}]')
    with pytest.raises(SettingsError, match=r"variants\.0\.test_time: test_time\.method must be one of none, matt, sgctr"):
        load_settings()
