"""Alert and recording rules: `promtool check rules`, `promtool test rules`, and the contract.

promtool comes from Debian's `prometheus` package; the suite installs it when it is missing
(root + apt-get) and skips with the reason only where it cannot. The metric names the rules
and the dashboard use are checked against the service's real metrics registry, so a rename
on either side fails here instead of silently emptying a panel or an alert.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from loadtests.local import find_or_install_prometheus

REPO = Path(__file__).resolve().parent.parent
PROM = REPO / "deploy" / "prometheus"
RULES = PROM / "rules.yml"
RULE_TESTS = PROM / "tests" / "rules_test.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "ctr-serve.json"


@pytest.fixture(scope="module")
def promtool() -> str:
    found = find_or_install_prometheus()
    if isinstance(found, str):
        pytest.skip(found)
    return found[1]


def run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=cwd)


def alert_names() -> list[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [r["alert"] for g in groups for r in g["rules"] if "alert" in r]


def test_promtool_check_rules(promtool):
    r = run([promtool, "check", "rules", str(RULES)])
    assert r.returncode == 0, r.stdout + r.stderr


def test_promtool_unit_tests(promtool):
    r = run([promtool, "test", "rules", str(RULE_TESTS)], cwd=RULE_TESTS.parent)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


def test_promtool_unit_tests_can_fail(promtool, tmp_path):
    """A wrong expectation must fail, or the suite above proves nothing."""
    text = RULE_TESTS.read_text().replace("is 99.5ms (SLO 50ms)", "is 1ms (SLO 50ms)")
    (tmp_path / "tests").mkdir()
    (tmp_path / "rules.yml").write_text(RULES.read_text())
    bad = tmp_path / "tests" / "rules_test.yml"
    bad.write_text(text)
    r = run([promtool, "test", "rules", str(bad)], cwd=bad.parent)
    assert r.returncode != 0 and "CtrScoreLatencyP99OverSLO" in r.stdout + r.stderr


def test_every_alert_has_a_firing_unit_test():
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    fired = {c["alertname"] for t in tests for c in t.get("alert_rule_test", []) if c.get("exp_alerts")}
    assert set(alert_names()) == fired


def test_issue_alerts_are_all_there():
    names = set(alert_names())
    for needed in (
        "CtrScoreLatencyP99OverSLO", "CtrScoreErrorRateHigh", "CtrScoreRejecting", "CtrFeaturesDegraded",
        "CtrModelOnCPUButGPUExpected", "CtrModelReloadFailed", "CtrVariantLatencyDiverged", "CtrVariantCalibrationDiverged",
    ):
        assert needed in names
    groups = yaml.safe_load(RULES.read_text())["groups"]
    for r in (r for g in groups for r in g["rules"] if "alert" in r):
        assert r["labels"]["severity"] in {"page", "ticket"}
        assert r["annotations"]["summary"] and r["annotations"]["description"]


def test_every_alert_has_a_runbook_entry():
    doc = (REPO / "docs" / "operations.md").read_text()
    missing = [a for a in alert_names() if f"`{a}`" not in doc]
    assert not missing, f"docs/operations.md does not explain: {missing}"


def service_metric_names() -> set[str]:
    """Series names the real service exposes (histogram/counter suffixes included)."""
    from service.metrics import Metrics

    names: set[str] = set()
    for family in Metrics().registry.collect():
        base = family.name
        if family.type == "histogram":
            names |= {f"{base}_bucket", f"{base}_sum", f"{base}_count"}
        elif family.type == "counter":
            names |= {f"{base}_total"}
        else:
            names.add(base)
    return names


def referenced_metrics(text: str) -> set[str]:
    # recording-rule names (level:metric:operation) are not service metrics
    return set(re.findall(r"(?<![:\w])(ctr_[a-z_]+)(?![:\w])", text))


def test_rules_and_dashboard_use_only_real_metric_names():
    exposed = service_metric_names()
    rules_text = RULES.read_text()
    dash = json.loads(DASHBOARD.read_text())
    exprs = " ".join(t["expr"] for p in dash["panels"] for t in p["targets"])
    exprs += " " + " ".join(json.dumps(v.get("query", "")) for v in dash["templating"]["list"])
    for where, text in (("rules.yml", rules_text), ("dashboard", exprs)):
        unknown = referenced_metrics(text) - exposed
        assert not unknown, f"{where} uses metrics the service does not expose: {sorted(unknown)}"


def check_config(promtool: str, cfg_path: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    """promtool check config, with absolute rule paths rewritten to the repo's rules file."""
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["rule_files"] = [str(RULES)]
    out = tmp_path / cfg_path.name
    out.write_text(yaml.safe_dump(cfg))
    return run([promtool, "check", "config", str(out)])


@pytest.mark.parametrize("name", ["prometheus.yml", "prometheus.gpu.yml"])
def test_compose_prometheus_config(promtool, tmp_path, name):
    r = check_config(promtool, PROM / name, tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr


def test_kubernetes_scrape_config(promtool, tmp_path):
    r = check_config(promtool, PROM / "kubernetes.yml", tmp_path)
    if r.returncode != 0 and "kubernetes_sd_configs not found" in r.stdout + r.stderr:
        # Debian builds Prometheus without Kubernetes discovery: check everything else by
        # swapping the discovery block for a static target.
        cfg = yaml.safe_load((PROM / "kubernetes.yml").read_text())
        for job in cfg["scrape_configs"]:
            if job.pop("kubernetes_sd_configs", None) is not None:
                job["static_configs"] = [{"targets": ["10.0.0.1:8000"]}]
        swapped = tmp_path / "k8s-static.yml"
        swapped.write_text(yaml.safe_dump(cfg))
        r = check_config(promtool, swapped, tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
