"""The Grafana dashboard against a real Prometheus scraping a real service under traffic.

Starts `ctr serve` (real uvicorn, real onnxruntime, features in the real Redis) with two A/B
variants, a real Prometheus (Debian's package) scraping it every second with the alert rules
loaded, sends a little realistic traffic, then runs every panel's PromQL and checks that
each returns data, and that every rule evaluates without error.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import httpx
import pytest
import yaml

from loadtests.local import (
    ctr_executable,
    find_or_install_prometheus,
    prom_json,
    prom_query,
    running_prometheus,
    running_service,
)
from loadtests.traffic import TrafficConfig, TrafficGenerator
from tests.testing import load_script

REPO = Path(__file__).resolve().parent.parent
GRAFANA = REPO / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "ctr-serve.json"
RATE_WINDOW = "30s"


def test_dashboard_json_is_generated_from_dashboard_py():
    mod = load_script(GRAFANA / "dashboard.py", "ctr_dashboard")
    assert DASHBOARD.read_text() == mod.render(), "run `python deploy/grafana/dashboard.py` and commit the JSON"


def test_dashboard_covers_the_issue_panels():
    titles = " | ".join(p["title"] for p in json.loads(DASHBOARD.read_text())["panels"]).lower()
    for word in ("request rate", "latency", "error rate", "batch rows", "queue seconds", "inference seconds",
                 "feature fetch", "feature misses", "cache hit", "in-flight", "model version and provider"):
        assert word in titles, word
    dash = json.loads(DASHBOARD.read_text())
    latency = next(p for p in dash["panels"] if p["title"].startswith("Latency"))
    assert [t["expr"].split(",")[0] for t in latency["targets"]] == [
        "histogram_quantile(0.5", "histogram_quantile(0.95", "histogram_quantile(0.99"
    ]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


def panel_queries() -> list[tuple[str, str, bool]]:
    dash = json.loads(DASHBOARD.read_text())
    out = []
    for p in dash["panels"]:
        for t in p["targets"]:
            expr = t["expr"].replace("$__rate_interval", RATE_WINDOW).replace('"$variant"', '".*"')
            assert "$" not in expr, f"unsubstituted variable in {p['title']}: {expr}"
            out.append((f"{p['title']} [{t['refId']}]", expr, bool(t.get("instant"))))
    return out


@pytest.fixture(scope="module")
def prometheus_bin() -> str:
    found = find_or_install_prometheus()
    if isinstance(found, str):
        pytest.skip(found)
    return found[0]


@pytest.fixture(scope="module")
def redis_features(redis_url, synth_dir):
    """Users and items loaded into the real Redis with `ctr features load` under a fresh prefix."""
    import redis

    prefix = f"ctrtest-ops-{uuid.uuid4().hex[:10]}"
    for entity, table in (("user", "users.parquet"), ("item", "items.parquet")):
        r = subprocess.run(
            [*ctr_executable(), "features", "load", "--table", str(synth_dir / table), "--entity", entity, "--redis", redis_url, "--prefix", prefix],
            capture_output=True, text=True, timeout=120, cwd=REPO,
        )
        assert r.returncode == 0, r.stderr[-2000:]
    yield prefix
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture(scope="module")
def model_repo(tmp_path_factory, synth_spec) -> Path:
    from tests.testing import tiny_package

    repo = tmp_path_factory.mktemp("models")
    tiny_package(repo, "ctr", 1, synth_spec)
    return repo


AB_CONFIG = {
    "variants": [
        {"name": "control", "model": "ctr", "version": "latest", "weight": 70},
        {"name": "treatment", "model": "ctr", "version": "latest", "weight": 30},
    ],
    "scorer": {"providers": ["CPUExecutionProvider"], "intra_op_threads": 1, "buckets": [1, 32, 128, 512]},
    "batcher": {"max_batch_rows": 512},
}


def drive_traffic(url: str, synth_dir: Path, spec: Path, seconds: float, max_requests: int) -> int:
    gen = TrafficGenerator(
        TrafficConfig(users_table=str(synth_dir / "users.parquet"), items_table=str(synth_dir / "items.parquet"),
                      spec=str(spec), min_items=20, max_items=120, cold_item_frac=0.02, seed=3)
    )
    ok = 0
    deadline = time.monotonic() + seconds
    with httpx.Client(base_url=url, timeout=10) as client:
        for _ in range(max_requests):
            if time.monotonic() > deadline:
                break
            r = client.post("/score", json=gen.request())
            assert r.status_code == 200, r.text
            ok += 1
        # a bad call and an unknown variant: 4xx series exist too
        assert client.post("/score", json={"user_id": "u1", "items": []}).status_code == 422
        assert client.post("/score", json={"user_id": "u1", "items": [{"item_id": "x"}], "variant": "nope"}).status_code == 404
    return ok


@pytest.mark.slow
def test_every_panel_returns_data_from_a_live_service(tmp_path, prometheus_bin, redis_url, redis_features, model_repo, synth_dir):
    with running_service(model_repo, AB_CONFIG, tmp_path, redis_url=redis_url, prefix=redis_features) as svc:
        target = svc.removeprefix("http://")
        with running_prometheus(prometheus_bin, target, tmp_path) as prom:
            # Wait for the first scrape, so the counters' starting values are recorded, then
            # send traffic across several scrapes and let one more scrape land after it.
            deadline = time.monotonic() + 30
            while not any(s["value"][1] == "1" for s in prom_query(prom, 'up{job="ctr-serve"}')):
                assert time.monotonic() < deadline, "Prometheus never scraped the service"
                time.sleep(0.3)
            sent = drive_traffic(svc, synth_dir, model_repo / "ctr" / "1" / "feature_spec.json", seconds=5.0, max_requests=3000)
            assert sent >= 20
            time.sleep(2.5)

            empty, nan_only = [], []
            for title, expr, _instant in panel_queries():
                result = prom_query(prom, expr)
                if not result:
                    empty.append(f"{title}: {expr}")
                elif not any(math.isfinite(float(s["value"][1])) for s in result):
                    nan_only.append(f"{title}: {expr}")
            assert not empty, "panels without data:\n" + "\n".join(empty)
            assert not nan_only, "panels with only NaN:\n" + "\n".join(nan_only)

            # The variant template variable lists both A/B arms.
            series = prom_json(prom, "/api/v1/label/variant/values?match[]=ctr_model_info")
            assert set(series) == {"control", "treatment"}
            # Both variants answered, and the model info carries the provider.
            info = prom_query(prom, "ctr_model_info")
            assert {s["metric"]["provider"] for s in info} == {"CPUExecutionProvider"}
            rate = prom_query(prom, f"sum by (variant) (rate(ctr_request_seconds_count{{status=\"200\"}}[{RATE_WINDOW}]))")
            assert {s["metric"]["variant"] for s in rate} == {"control", "treatment"}

            # Every recording and alerting rule evaluates cleanly on the real series.
            groups = prom_json(prom, "/api/v1/rules")["groups"]
            rules = [r for g in groups for r in g["rules"]]
            groups_in_file = yaml.safe_load((REPO / "deploy" / "prometheus" / "rules.yml").read_text())["groups"]
            assert len(rules) == sum(len(g["rules"]) for g in groups_in_file)
            # A group's first evaluation can come up to one group interval after load (Prometheus
            # staggers groups), so wait for the slowest group's interval plus a margin.
            slowest = max((g["interval"] for g in groups), default=1.0)
            deadline = time.monotonic() + slowest + 15
            while any(r.get("health") != "ok" for r in rules) and time.monotonic() < deadline:
                time.sleep(0.5)
                rules = [r for g in prom_json(prom, "/api/v1/rules")["groups"] for r in g["rules"]]
            bad = [(r["name"], r.get("health"), r.get("lastError")) for r in rules if r.get("health") != "ok"]
            assert not bad, bad
            # A healthy service under light load fires nothing.
            firing = [a["labels"]["alertname"] for a in prom_json(prom, "/api/v1/alerts")["alerts"] if a["state"] == "firing"]
            assert not firing, firing

            # End to end: publish a corrupt version, reload the variant that follows `latest`;
            # the service refuses it (old version keeps serving) and the alert fires.
            bad = model_repo / "ctr" / "2"
            shutil.copytree(model_repo / "ctr" / "1", bad)
            (bad / "model.onnx").write_bytes(b"not an onnx model")
            r = httpx.post(f"{svc}/admin/reload", json={"variant": "treatment"}, headers={"Authorization": "Bearer local-test-token"}, timeout=30)
            assert r.status_code == 409, r.text
            models = {m["variant"]: m["version"] for m in httpx.get(f"{svc}/models").json()["models"]}
            assert models == {"control": 1, "treatment": 1}
            deadline = time.monotonic() + 20
            firing = []
            while time.monotonic() < deadline:
                firing = [a for a in prom_json(prom, "/api/v1/alerts")["alerts"] if a["state"] == "firing"]
                if any(a["labels"]["alertname"] == "CtrModelReloadFailed" for a in firing):
                    break
                time.sleep(0.5)
            # A refused reload is also a skipped version: both tickets name the variant.
            names = {(a["labels"]["alertname"], a["labels"]["variant"]) for a in firing}
            assert ("CtrModelReloadFailed", "treatment") in names
            assert names <= {("CtrModelReloadFailed", "treatment"), ("CtrModelVersionSkipped", "treatment")}
