"""MATT served per variant: real uvicorn, real onnxruntime, a tiny trained package with statistics.

One version serves as three variants (plain, MATT on every row, MATT on uncertain rows), so
an A/B test compares them. The MATT variants must score exactly as the offline code
(`ctr evaluate`'s OfflineScorer + MattScorer) does on the same raw rows.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest

from ctr.cli import main
from export.offline_scorer import OfflineScorer
from service.app import create_app
from service.registry import NoServableModel
from tests.service_support import config, metric_value, request_body, trained_package, offline_rows  # noqa: F401 (fixture)
from tests.testing import ServerThread
from testtime.matt import TestTimeConfig, load_matt
from testtime.stats import MANIFEST_FILE, STATS_FILE

pytestmark = pytest.mark.slow

MATT_ALL = {"method": "matt", "paths": 4, "trigger": "all"}
# The tiny model scores every row near the base rate: a narrow band picks some rows, not all.
MATT_UNCERTAIN = {"method": "matt", "paths": 4, "trigger": "uncertain", "uncertain_logit_band": 0.05}


def _build_stats(package: Path, synth_dir: Path) -> None:
    assert main(["stats", "build", "--package", str(package), "--data", str(synth_dir), "--width-log2", "14"]) == 0


@pytest.fixture(scope="module")
def repo_with_stats(trained_package: Path, synth_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    repo = tmp_path_factory.mktemp("tt") / "models"
    dst = repo / "synth" / "1"
    shutil.copytree(trained_package, dst)
    _build_stats(dst, synth_dir)
    return repo


def _publish_without_stats(repo: Path, version: int) -> Path:
    """Version `version`: version 1's files (its metadata renumbered), without statistics."""
    import json

    dst = repo / "synth" / str(version)
    shutil.copytree(repo / "synth" / "1", dst)
    for f in (STATS_FILE, MANIFEST_FILE):
        (dst / f).unlink()
    meta = json.loads((dst / "metadata.json").read_text())
    meta["version"] = version
    (dst / "metadata.json").write_text(json.dumps(meta))
    return dst


def _variants(**test_times: dict | None) -> list[dict]:
    return [{"name": name, "model": "synth", "test_time": tt} for name, tt in test_times.items()]


def test_plain_and_matt_variants_of_one_version_match_the_offline_scores(repo_with_stats: Path, synth_dir: Path):
    package = repo_with_stats / "synth" / "1"
    offline = OfflineScorer(package)
    matt_all = load_matt(package, TestTimeConfig(**MATT_ALL), offline.package.metadata, offline.spec)
    matt_unc = load_matt(package, TestTimeConfig(**MATT_UNCERTAIN), offline.package.metadata, offline.spec)
    app = create_app(config(repo_with_stats, synth_dir, variants=_variants(plain=None, matt=MATT_ALL, sel=MATT_UNCERTAIN)))
    bodies = [request_body(synth_dir, n_items=48, user_index=s, seed=s) for s in range(3)]
    rows = sum(len(b["items"]) for b in bodies)
    with ServerThread(app) as srv:
        registry = app.state.service.registry
        # One version, three variants: one onnxruntime session, three batchers.
        assert registry.models["plain"].scorer is registry.models["matt"].scorer is registry.models["sel"].scorer
        assert registry.models["plain"].batcher is not registry.models["matt"].batcher
        described = {d["variant"]: d for d in httpx.get(srv.url + "/models").json()["models"]}
        assert described["plain"]["test_time"] is None
        assert described["matt"]["test_time"] == {"method": "matt", "paths": 4, "trigger": "all"}

        answers: dict[str, list[np.ndarray]] = {"plain": [], "matt": [], "sel": []}
        for body in bodies:
            tokens = offline.encode(pd.DataFrame(offline_rows(synth_dir, body)))
            want = {"plain": offline.score_tokens(tokens), "matt": matt_all.score(tokens, offline.score_tokens),
                    "sel": matt_unc.score(tokens, offline.score_tokens)}
            for variant in answers:
                r = httpx.post(srv.url + "/score", json={**body, "variant": variant})
                assert r.status_code == 200, r.text
                doc = r.json()
                # The response shape does not depend on the variant's test-time setting.
                assert sorted(doc) == ["degraded", "model", "request_id", "scores", "variant", "version"]
                assert doc["variant"] == variant and doc["version"] == 1 and len(doc["scores"]) == len(body["items"])
                np.testing.assert_allclose(doc["scores"], want[variant], atol=1e-5, rtol=0)
                answers[variant].append(np.asarray(doc["scores"]))
        plain, full, sel = (np.concatenate(answers[v]) for v in ("plain", "matt", "sel"))
        assert np.abs(full - plain).max() > 1e-4  # the paths changed the scores
        assert 0 < np.count_nonzero(np.abs(sel - plain) > 1e-7) < rows  # only the uncertain rows moved

        # Concurrent requests share batches; a row's paths do not depend on its batch mates.
        from tests.service_support import fire
        import asyncio

        many = asyncio.run(fire(srv.url, [{**b, "variant": "matt"} for b in bodies] * 4, concurrency=12))
        for i, r in enumerate(many):
            np.testing.assert_allclose(r.json()["scores"], answers["matt"][i % len(bodies)], atol=1e-5, rtol=0)

        text = httpx.get(srv.url + "/metrics").text
    n_all = rows + len(many) * 48
    assert metric_value(text, "ctr_test_time_rows_total", variant="matt", method="matt") == n_all
    assert metric_value(text, "ctr_test_time_rows_with_paths_total", variant="matt", method="matt") == n_all
    assert metric_value(text, "ctr_test_time_extra_rows_total", variant="matt", method="matt") == 3 * n_all
    assert metric_value(text, "ctr_test_time_rows_total", variant="plain") == 0
    # The extra rows went through the variant's batcher: 4 model rows per row.
    assert metric_value(text, "ctr_batch_rows_sum", variant="matt") == 4 * n_all
    assert metric_value(text, "ctr_batch_rows_sum", variant="plain") == rows
    selected = metric_value(text, "ctr_test_time_rows_with_paths_total", variant="sel", method="matt")
    assert matt_unc.counters.rows_with_paths == selected and 0 < selected < rows
    assert metric_value(text, "ctr_test_time_extra_rows_total", variant="sel", method="matt") == 3 * selected
    assert metric_value(text, "ctr_batch_rows_sum", variant="sel") == rows + 3 * selected


def test_a_package_without_statistics_refuses_matt_but_serves_plain(repo_with_stats: Path, synth_dir: Path, tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture):
    repo = tmp_path / "models"
    shutil.copytree(repo_with_stats / "synth" / "1", repo / "synth" / "1")
    _publish_without_stats(repo, 2)

    # Pinned to the version without statistics: the process does not start, and says why.
    with pytest.raises(NoServableModel, match=r"pinned version 2 .* cannot be served: 2 \(test_time\)"):
        create_app(config(repo, synth_dir, variants=[{"name": "matt", "model": "synth", "version": 2, "test_time": MATT_ALL}]))
    assert "has no test_time_stats.npz: build it with `ctr stats build --package" in caplog.text

    # "latest": plain serves version 2; MATT skips it (counted) and serves version 1.
    app = create_app(config(repo, synth_dir, variants=_variants(plain=None, matt=MATT_ALL)))
    with ServerThread(app) as srv:
        body = request_body(synth_dir, n_items=8)
        for variant, version in (("plain", 2), ("matt", 1)):
            r = httpx.post(srv.url + "/score", json={**body, "variant": variant})
            assert r.status_code == 200 and r.json()["version"] == version, r.text
        text = httpx.get(srv.url + "/metrics").text
        assert metric_value(text, "ctr_model_load_failures_total", variant="matt", reason="test_time") == 1
        assert metric_value(text, "ctr_model_load_failures_total", variant="plain") == 0


def test_hot_reload_rebuilds_the_paths_and_a_refused_version_still_moves_plain(repo_with_stats: Path, synth_dir: Path,
                                                                              tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("CTR_ADMIN_TOKEN", "t0ken")
    auth = {"Authorization": "Bearer t0ken"}
    repo = tmp_path / "models"
    shutil.copytree(repo_with_stats / "synth" / "1", repo / "synth" / "1")
    # The MATT variant is listed first: its refusal of version 2 must not stop plain's reload.
    app = create_app(config(repo, synth_dir, variants=_variants(matt=MATT_ALL, plain=None)))
    with ServerThread(app) as srv:
        registry = app.state.service.registry
        first = registry.models["matt"].test_time
        v2 = _publish_without_stats(repo, 2)
        r = httpx.post(srv.url + "/admin/reload", headers=auth)
        assert r.status_code == 409
        results = {x["variant"]: x for x in r.json()["results"]}
        assert results["plain"]["result"] == "ok" and results["plain"]["version"] == 2
        assert results["matt"]["result"] == "failed" and "ctr stats build" in results["matt"]["error"]
        assert registry.models["matt"].version == 1 and registry.models["matt"].test_time is first

        _build_stats(v2, synth_dir)  # the statistics arrive: an explicit reload picks them up
        r = httpx.post(srv.url + "/admin/reload", headers=auth, json={"variant": "matt"})
        assert r.status_code == 200, r.text
        now = registry.models["matt"]
        assert now.version == 2 and now.test_time is not None and now.test_time is not first
        assert now.scorer is registry.models["plain"].scorer  # shares plain's version-2 session
        body = request_body(synth_dir, n_items=8)
        r = httpx.post(srv.url + "/score", json={**body, "variant": "matt"})
        assert r.status_code == 200 and r.json()["version"] == 2
        text = httpx.get(srv.url + "/metrics").text
        assert metric_value(text, "ctr_model_load_failures_total", variant="matt", reason="test_time") == 1


def test_the_variant_setting_from_a_file_and_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from service.config import SettingsError, load_settings

    cfg_file = tmp_path / "serve.yaml"
    cfg_file.write_text("variants: [{name: plain, model: m}, {name: matt, model: m, test_time: {paths: 4, trigger: uncertain}}]\n")
    cfg = load_settings(cfg_file)
    assert cfg.variants[0].test_time is None
    assert cfg.variants[1].test_time == TestTimeConfig(method="matt", paths=4, trigger="uncertain")

    monkeypatch.setenv("CTR_VARIANTS", '[{"name": "matt", "model": "m", "test_time": {"paths": 2, "kappa": 1}}]')
    tt = load_settings().variants[0].test_time
    assert tt is not None and tt.paths == 2 and tt.kappa == [1.0]

    # A typo under test_time names that section's keys, not the variant's.
    monkeypatch.setenv("CTR_VARIANTS", '[{"name": "matt", "model": "m", "test_time": {"pahts": 2}}]')
    with pytest.raises(SettingsError, match=r"unknown key 'variants\.0\.test_time\.pahts' \(valid keys under 'variants\.0\.test_time': method, paths, trigger"):
        load_settings()
    monkeypatch.setenv("CTR_VARIANTS", '[{"name": "matt", "model": "m", "test_time": {"paths": 0}}]')
    with pytest.raises(SettingsError, match=r"variants\.0\.test_time\.paths"):
        load_settings()
