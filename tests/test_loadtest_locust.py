"""Load tests: the traffic generator, the A/B split check, the shapes, and locust itself.

The integration tests run the real locust binary headless for a few seconds against a real
`ctr serve` on loopback. The SLO gate's exit code is checked with thresholds that are
deliberately trivial to pass or impossible to meet, so no test depends on this machine's speed.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from loadtests.local import running_service
from loadtests.profiles import ramp_users, soak_users, step_users
from loadtests.slo import VariantTally, parse_weights, split_check, weights_from_config
from loadtests.traffic import TrafficConfig, TrafficGenerator, Zipf

REPO = Path(__file__).resolve().parent.parent
LOCUST = [str(Path(sys.executable).with_name("locust"))]


@pytest.fixture(scope="module")
def gen(synth_dir, synth_spec, tmp_path_factory) -> TrafficGenerator:
    spec = tmp_path_factory.mktemp("spec") / "feature_spec.json"
    synth_spec.save(spec)
    return TrafficGenerator(TrafficConfig(users_table=str(synth_dir / "users.parquet"), items_table=str(synth_dir / "items.parquet"), spec=str(spec), seed=5))


def test_requests_are_realistic(gen, synth_dir):
    import pandas as pd

    known_items = set(pd.read_parquet(synth_dir / "items.parquet")["item_id"].astype(str))
    known_users = set(pd.read_parquet(synth_dir / "users.parquet")["user_id"].astype(str))
    sizes, cold, total = [], 0, 0
    for _ in range(300):
        body = gen.request()
        ids = [i["item_id"] for i in body["items"]]
        assert len(ids) == len(set(ids)), "candidates are distinct"
        assert body["user_id"] in known_users
        assert set(body["context"]) == {"device", "hour"}
        sizes.append(len(ids))
        cold += sum(i not in known_items for i in ids)
        total += len(ids)
    assert 20 <= min(sizes) and max(sizes) <= min(500, len(known_items))
    assert np.median(sizes) < np.mean(sizes) or max(sizes) > 200, "log-uniform: many short lists, some long ones"
    assert 0 < cold / total < 0.05


def test_zipf_is_skewed():
    rng = np.random.default_rng(0)
    z = Zipf([f"u{i}" for i in range(1000)], 1.1, rng)
    counts = sorted(np.unique(z.draw(50_000), return_counts=True)[1], reverse=True)
    assert sum(counts[:10]) / 50_000 > 0.25, "the top 1% of ids take a large share"
    assert len(z.draw_distinct(300)) == 300 == len(set(z.draw_distinct(300)))
    assert len(z.draw_distinct(5000)) == 1000


def test_weights_parsing(tmp_path):
    assert parse_weights("control=95,treatment=5") == {"control": 0.95, "treatment": 0.05}
    with pytest.raises(ValueError):
        parse_weights("control")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("variants:\n  - {name: a, model: m, weight: 3}\n  - {name: b, model: m, weight: 1}\n")
    assert weights_from_config(str(cfg)) == {"a": 0.75, "b": 0.25}
    assert set(weights_from_config(str(REPO / "deploy" / "config" / "ctr-serve.yaml"))) == {"control", "treatment"}


def tally_of(shares: dict[str, int]) -> VariantTally:
    t = VariantTally()
    n = 0
    for variant, users in shares.items():
        for _ in range(users):
            t.add(variant, f"u{n}", 10)
            n += 1
    return t


def test_split_check_flags_sample_ratio_mismatch_and_switching_users():
    w = {"control": 0.9, "treatment": 0.1}
    assert split_check(tally_of({"control": 905, "treatment": 95}), w) == []
    problems = split_check(tally_of({"control": 700, "treatment": 300}), w)
    assert len(problems) == 2 and "treatment" in problems[1]
    t = tally_of({"control": 90, "treatment": 10})
    t.add("treatment", "u0", 10)  # u0 was answered by control before
    assert any("more than one variant" in p for p in split_check(t, w))
    assert any("not in the configured weights" in p for p in split_check(tally_of({"control": 90, "shadow": 10}), w))


def test_shape_profiles():
    assert [ramp_users(t, 20, 10.0, 5.0) for t in (0.0, 0.4, 5.0, 9.9, 12.0)] == [1, 1, 10, 20, 20]
    assert ramp_users(15.0, 20, 10.0, 5.0) is None
    assert [step_users(t, 10, 4, 10.0) for t in (0, 9.9, 10, 20, 35)] == [4, 4, 8, 10, 10]
    assert step_users(40.0, 10, 4, 10.0) is None
    assert [soak_users(t, 8, 4.0, 100.0) for t in (2.0, 50.0, 103.9)] == [4, 8, 8]
    assert soak_users(104.0, 8, 4.0, 100.0) is None


# ------------------------------------------------------------------ locust against the service

AB = {"control": 70, "treatment": 30}
CONFIG = {
    "variants": [{"name": k, "model": "ctr", "version": "latest", "weight": v} for k, v in AB.items()],
    "scorer": {"providers": ["CPUExecutionProvider"], "intra_op_threads": 1, "buckets": [1, 32, 128, 512]},
    "batcher": {"max_batch_rows": 512},
}


@pytest.fixture(scope="module")
def service(tmp_path_factory, synth_dir, synth_spec):
    from tests.testing import tiny_package

    work = tmp_path_factory.mktemp("lt")
    repo = work / "models"
    tiny_package(repo, "ctr", 1, synth_spec)
    with running_service(repo, CONFIG, work, users=synth_dir / "users.parquet", items=synth_dir / "items.parquet") as url:
        yield url, repo / "ctr" / "1" / "feature_spec.json"


def locust(url: str, synth_dir: Path, spec: Path, out: Path, *extra: str) -> tuple[subprocess.CompletedProcess, dict]:
    cmd = [
        *LOCUST, "-f", str(REPO / "loadtests" / "locustfile.py") + "".join("," + str(REPO / "loadtests" / e) for e in extra if e.startswith("shape_")),
        "--headless", "--only-summary", "--host", url,
        "--users-table", str(synth_dir / "users.parquet"), "--items-table", str(synth_dir / "items.parquet"),
        "--spec", str(spec), "--max-items", "120",
        "--csv", str(out), "--summary-json", str(out) + ".json",
        *[e for e in extra if not e.startswith("shape_")],
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=90, cwd=REPO)
    summary = json.loads(Path(str(out) + ".json").read_text()) if Path(str(out) + ".json").exists() else {}
    return r, summary


@pytest.mark.slow
def test_locust_headless_ab_run_passes_an_easy_gate(service, synth_dir, tmp_path):
    url, spec = service
    weights = ",".join(f"{k}={v}" for k, v in AB.items())
    r, summary = locust(url, synth_dir, spec, tmp_path / "ab", "-u", "3", "-r", "3", "-t", "4s",
                        "--ab-weights", weights, "--slo-p99-ms", "60000", "--slo-max-error-rate", "0.5", "--slo-min-rows-per-s", "1")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert summary["passed"] and summary["failures"] == []
    assert summary["requests"] > 10 and summary["rows"] >= 20 * summary["requests"] - 20 * summary["failed_requests"]
    assert {v["variant"] for v in summary["variants"]} == set(AB)
    assert "SLO gate passed" in r.stderr
    # locust's own CSV has one row per variant
    with open(tmp_path / "ab_stats.csv") as f:
        names = {row["Name"] for row in csv.DictReader(f)}
    assert {"/score [control]", "/score [treatment]", "Aggregated"} <= names


@pytest.mark.slow
def test_locust_gate_fails_an_impossible_slo_with_a_step_shape(service, synth_dir, tmp_path):
    url, spec = service
    r, summary = locust(url, synth_dir, spec, tmp_path / "step", "shape_step.py", "--peak-users", "2", "--step-users", "1",
                        "--step-s", "1", "-r", "2", "--variant", "treatment",
                        "--slo-p99-ms", "0.001", "--slo-min-rows-per-s", "1e12")
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    assert not summary["passed"]
    reasons = " ".join(summary["failures"])
    assert "p99" in reasons and "throughput" in reasons
    # --variant overrides the hash: every answer came from the forced variant
    assert [v["variant"] for v in summary["variants"]] == ["treatment"]
    assert summary["requests"] > 0
