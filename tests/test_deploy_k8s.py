"""Kubernetes manifests: schema-valid (kubernetes-validate, strict) and wired together.

Beyond the schemas: probes map to /healthz and /readyz, the grace period covers the drain,
the GPU Deployment differs from the CPU one only where it must, the HPA's custom metric is
one the prometheus-adapter rules publish (their PromQL is parsed by promtool when present),
the ConfigMap is a valid service config and the container args parse with `ctr serve`.
"""

from __future__ import annotations

import argparse
import copy
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "deploy" / "k8s"
MANIFESTS = sorted(K8S.rglob("*.yaml"))
# The oldest Kubernetes minor still widely run, and the newest the validator knows.
VERSIONS = ["1.30.0", kubernetes_validate.latest_version()]


def load(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def by_kind(kind: str) -> dict[str, dict]:
    return {str(p.relative_to(K8S)): d for p in MANIFESTS for d in load(p) if d["kind"] == kind}


def deployment(variant: str) -> dict:
    return load(K8S / variant / "deployment.yaml")[0]


def container(dep: dict) -> dict:
    return dep["spec"]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: str(p.relative_to(K8S)))
@pytest.mark.parametrize("version", VERSIONS)
def test_manifest_matches_kubernetes_schema(path, version):
    docs = load(path)
    assert docs
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


def test_validator_rejects_a_broken_manifest():
    dep = deployment("cpu")
    bad = copy.deepcopy(dep)
    container(bad)["livenessProbe"]["httpGet"]["paht"] = "/healthz"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, VERSIONS[-1], strict=True)
    bad = copy.deepcopy(dep)
    container(bad)["resources"]["limits"]["cpu"] = {"cores": 4}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, VERSIONS[-1], strict=True)


def test_every_expected_kind_is_shipped():
    kinds = {d["kind"] for p in MANIFESTS for d in load(p)}
    assert {"Deployment", "Service", "ConfigMap", "PodDisruptionBudget", "HorizontalPodAutoscaler", "PersistentVolumeClaim"} <= kinds


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_probes_drain_and_resources(variant):
    dep = deployment(variant)
    pod = dep["spec"]["template"]["spec"]
    c = container(dep)
    port = c["ports"][0]
    assert port["name"] == "http" and port["containerPort"] == 8000
    assert c["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    # start-up gets its own long budget so liveness never kills a pod that is warming up
    s = c["startupProbe"]
    assert s["periodSeconds"] * s["failureThreshold"] >= 60
    # grace period >= preStop + drain_grace_s + the longest a queued row may wait, with margin
    cfg = yaml.safe_load(by_kind("ConfigMap")["common/configmap.yaml"]["data"]["config.yaml"])
    pre_stop = float(c["lifecycle"]["preStop"]["exec"]["command"][-1])
    needed = pre_stop + cfg["drain_grace_s"] + cfg["batcher"]["timeout_ms"] / 1000
    assert pod["terminationGracePeriodSeconds"] >= 2 * needed
    res = c["resources"]
    assert res["requests"]["cpu"] == res["limits"]["cpu"] and res["requests"]["memory"] == res["limits"]["memory"]
    # ctr serve sizes workers x threads from the pod's CPU quota; a fixed thread count would
    # be multiplied by the worker count and oversubscribe the cores.
    assert cfg["scorer"]["intra_op_threads"] == 0 and int(res["limits"]["cpu"]) >= 1
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    ann = dep["spec"]["template"]["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true" and ann["prometheus.io/port"] == str(port["containerPort"])
    assert dep["spec"]["template"]["metadata"]["labels"]["ctr-serve/device"] == variant
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_gpu_deployment_differs_from_cpu_only_where_it_must():
    cpu, gpu = deployment("cpu"), deployment("gpu")
    assert gpu["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "nvidia.com/gpu" not in container(cpu)["resources"]["limits"]
    assert any(t["key"] == "nvidia.com/gpu" for t in gpu["spec"]["template"]["spec"]["tolerations"])
    assert container(gpu)["image"].endswith("-cuda") and container(cpu)["image"].endswith("-cpu")
    for d in (cpu, gpu):
        d["metadata"]["labels"].pop("ctr-serve/device")
        d["spec"]["template"]["metadata"]["labels"].pop("ctr-serve/device")
        c = container(d)
        c.pop("image"), c.pop("resources")
        d["spec"]["template"]["spec"].pop("tolerations", None)
        d["spec"]["template"]["spec"].pop("nodeSelector", None)
    assert cpu == gpu


def test_selectors_match_pods():
    labels = deployment("cpu")["spec"]["template"]["metadata"]["labels"]
    svc = by_kind("Service")["common/service.yaml"]
    assert svc["spec"]["selector"].items() <= labels.items()
    assert svc["spec"]["ports"][0]["targetPort"] == "http"
    pdb = by_kind("PodDisruptionBudget")["common/pdb.yaml"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert deployment("cpu")["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_configmap_is_a_valid_service_config_with_ab_variants():
    from service.config import ServiceConfig

    text = by_kind("ConfigMap")["common/configmap.yaml"]["data"]["config.yaml"]
    cfg = ServiceConfig.model_validate(yaml.safe_load(text))
    assert len(cfg.variants) >= 2 and all(v.weight > 0 for v in cfg.variants)
    assert cfg.features.redis_url is None, "the Redis URL comes from the Secret, not the ConfigMap"
    mounts = {m["name"]: m["mountPath"] for m in container(deployment("cpu"))["volumeMounts"]}
    assert mounts["config"] == "/etc/ctr" and mounts["models"] == cfg.repo


def test_container_args_parse_with_ctr_serve():
    from service.cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="cmd"))
    c = container(deployment("cpu"))
    args = parser.parse_args(["serve", *c["args"]])
    assert args.config == "/etc/ctr/config.yaml" and args.host == "0.0.0.0" and args.port == 8000
    # $(CTR_REDIS_URL) is expanded by the kubelet from this env var, which comes from a Secret
    assert args.redis == "$(CTR_REDIS_URL)"
    env = {e["name"]: e for e in c["env"]}
    assert env["CTR_REDIS_URL"]["valueFrom"]["secretKeyRef"]["key"] == "url"
    assert env["CTR_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"]


def adapter_rules() -> list[dict]:
    cm = by_kind("ConfigMap")["prometheus-adapter/config.yaml"]
    return yaml.safe_load(cm["data"]["config.yaml"])["rules"]


def test_hpa_scales_the_deployment_on_an_adapter_metric():
    hpa = by_kind("HorizontalPodAutoscaler")["common/hpa.yaml"]
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": deployment("cpu")["metadata"]["name"]}
    published = {r["name"]["as"] for r in adapter_rules()}
    custom = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    assert custom and set(custom) <= published
    assert hpa["spec"]["minReplicas"] >= 2, "a PDB with maxUnavailable 1 needs at least two pods"


def test_adapter_queries_are_valid_promql(tmp_path):
    promtool = shutil.which("promtool")
    if not promtool:
        from loadtests.local import find_or_install_prometheus

        found = find_or_install_prometheus()
        if isinstance(found, str):
            pytest.skip(found)
        promtool = found[1]
    rules = []
    for i, r in enumerate(adapter_rules()):
        assert set(r["resources"]["overrides"]) == {"namespace", "pod"}
        series = r["seriesQuery"].split("{")[0]
        expr = (
            r["metricsQuery"]
            .replace("<<.Series>>", series)
            .replace("<<.LabelMatchers>>", 'namespace="ctr",pod=~"ctr-serve-.*"')
            .replace("<<.GroupBy>>", "pod")
        )
        rules.append({"record": f"adapter:rule{i}", "expr": expr})
        rules.append({"record": f"adapter:series{i}", "expr": r["seriesQuery"]})
    f = tmp_path / "adapter_rules.yml"
    f.write_text(yaml.safe_dump({"groups": [{"name": "adapter", "rules": rules}]}))
    r = subprocess.run([promtool, "check", "rules", str(f)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
