"""docker-compose stack: parsed and cross-checked (no Docker engine is needed or used).

There is no compose-spec validator on PyPI that matches current Compose, so these checks are
our own: the file's structure, that every referenced service, file and port exists and
agrees with the others (Prometheus scrapes the service's port, Grafana reads Prometheus),
that the service and feature-loader commands parse with the real `ctr` argument parser, and
that the mounted service config is a valid ServiceConfig.
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
COMPOSE = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
GPU = yaml.safe_load((DEPLOY / "docker-compose.gpu.yml").read_text())
TOP_KEYS = {"name", "services", "volumes", "networks", "configs", "secrets"}
SERVICE_KEYS = {
    "image", "build", "command", "entrypoint", "environment", "volumes", "ports", "depends_on",
    "healthcheck", "restart", "stop_grace_period", "deploy",
}
# produced on the host by `ctr quickstart --no-serve`, not shipped
GENERATED = {"../quickstart/models", "../quickstart/data"}


def ctr_parser() -> argparse.ArgumentParser:
    from service.cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="cmd"))
    return parser


def test_structure():
    assert set(COMPOSE) <= TOP_KEYS and set(GPU) <= TOP_KEYS
    assert {"redis", "features-load", "ctr-serve", "prometheus", "grafana"} <= set(COMPOSE["services"])
    for name, svc in {**COMPOSE["services"], **GPU["services"]}.items():
        assert set(svc) <= SERVICE_KEYS, f"{name}: unknown keys {set(svc) - SERVICE_KEYS}"
    for name, svc in COMPOSE["services"].items():
        assert "image" in svc or "build" in svc, name
        for dep in svc.get("depends_on", []):
            assert dep in COMPOSE["services"], f"{name} depends on unknown {dep}"
    assert set(GPU["services"]) <= set(COMPOSE["services"]), "the GPU file only overrides services"


def bind_mounts(services: dict) -> list[tuple[str, str, str]]:
    out = []
    for name, svc in services.items():
        for v in svc.get("volumes", []):
            src, dst, *_ = v.split(":")
            if src.startswith((".", "/")):
                out.append((name, src, dst))
    return out


def test_mounted_files_exist_and_named_volumes_are_declared():
    for name, src, _ in bind_mounts(COMPOSE["services"]) + bind_mounts(GPU["services"]):
        if src in GENERATED:
            continue
        assert (DEPLOY / src).exists(), f"{name} mounts missing {src}"
    named = {v.split(":")[0] for s in COMPOSE["services"].values() for v in s.get("volumes", []) if not v.startswith((".", "/"))}
    assert named <= set(COMPOSE.get("volumes") or {})


def test_ports_bind_loopback_only():
    for name, svc in COMPOSE["services"].items():
        for p in svc.get("ports", []):
            assert str(p).startswith("127.0.0.1:"), f"{name} publishes {p} on every interface"


def test_build_uses_the_repo_dockerfile_with_device_arg():
    assert COMPOSE["services"]["ctr-serve"]["build"] == {"context": "..", "args": {"DEVICE": "cpu"}}
    assert GPU["services"]["ctr-serve"]["build"]["args"]["DEVICE"] == "cuda"
    assert (DEPLOY / COMPOSE["services"]["ctr-serve"]["build"]["context"] / "Dockerfile").exists()
    dev = GPU["services"]["ctr-serve"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert dev["driver"] == "nvidia" and "gpu" in dev["capabilities"]


def test_service_command_and_config():
    from service.config import ServiceConfig

    svc = COMPOSE["services"]["ctr-serve"]
    args = ctr_parser().parse_args(["serve", *svc["command"]])
    assert args.host == "0.0.0.0" and args.port == 8000
    assert args.redis.startswith("redis://redis:")
    mounts = {dst: src for _, src, dst in bind_mounts({"s": svc})}
    cfg_file = DEPLOY / mounts[args.config]
    cfg = ServiceConfig.model_validate(yaml.safe_load(cfg_file.read_text()))
    assert cfg.repo == args.repo and mounts[args.repo] == "../quickstart/models"
    assert len(cfg.variants) == 2
    assert svc["ports"] == [f"127.0.0.1:{args.port}:{args.port}"]
    assert svc["depends_on"]["features-load"]["condition"] == "service_completed_successfully"


def test_feature_loader_commands_parse():
    svc = COMPOSE["services"]["features-load"]
    assert svc["entrypoint"] == ["sh", "-c"]
    script = svc["command"][0]
    loads = [shlex.split(part) for part in script.split("&&")]
    assert {a[a.index("--entity") + 1] for a in loads} == {"user", "item"}
    redis_url = ctr_parser().parse_args(["serve", *COMPOSE["services"]["ctr-serve"]["command"]]).redis
    for argv in loads:
        assert argv[0] == "ctr"
        args = ctr_parser().parse_args(argv[1:])
        assert args.redis == redis_url
        assert args.table.startswith("/data/")


def test_prometheus_scrapes_the_service_and_loads_rules():
    prom = COMPOSE["services"]["prometheus"]
    mounts = {dst: src for _, src, dst in bind_mounts({"p": prom})}
    cfg = yaml.safe_load((DEPLOY / mounts["/etc/prometheus/prometheus.yml"]).read_text())
    assert cfg["rule_files"] == ["/etc/prometheus/rules.yml"]
    assert mounts["/etc/prometheus/rules.yml"] == "./prometheus/rules.yml"
    job = next(j for j in cfg["scrape_configs"] if j["job_name"] == "ctr-serve")
    port = ctr_parser().parse_args(["serve", *COMPOSE["services"]["ctr-serve"]["command"]]).port
    assert job["static_configs"][0]["targets"] == [f"ctr-serve:{port}"]
    assert job["static_configs"][0]["labels"]["device"] == "cpu"
    gpu_mounts = {dst: src for _, src, dst in bind_mounts(GPU["services"])}
    gpu_cfg = yaml.safe_load((DEPLOY / gpu_mounts["/etc/prometheus/prometheus.yml"]).read_text())
    gpu_job = next(j for j in gpu_cfg["scrape_configs"] if j["job_name"] == "ctr-serve")
    assert gpu_job["static_configs"][0]["labels"]["device"] == "gpu"
    job["static_configs"][0]["labels"]["device"] = "gpu"
    assert cfg == gpu_cfg, "the GPU Prometheus config differs only in the device label"


def test_grafana_provisions_the_datasource_and_dashboard():
    graf = COMPOSE["services"]["grafana"]
    mounts = {dst: src for _, src, dst in bind_mounts({"g": graf})}
    prov = DEPLOY / mounts["/etc/grafana/provisioning"]
    ds = yaml.safe_load((prov / "datasources" / "prometheus.yml").read_text())["datasources"][0]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"
    assert "prometheus" in COMPOSE["services"] and "127.0.0.1:9090:9090" in COMPOSE["services"]["prometheus"]["ports"]
    provider = yaml.safe_load((prov / "dashboards" / "ctr-serve.yml").read_text())["providers"][0]
    dash_dir = DEPLOY / mounts[provider["options"]["path"]]
    dashboards = list(dash_dir.glob("*.json"))
    assert dashboards
    dash = json.loads(dashboards[0].read_text())
    ds_var = next(v for v in dash["templating"]["list"] if v["type"] == "datasource")
    assert ds_var["current"]["value"] == ds["uid"]
    home = graf["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(provider["options"]["path"]) and (dash_dir / Path(home).name).exists()
