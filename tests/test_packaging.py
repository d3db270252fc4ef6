"""The base install serves without the training stack; training commands name their extra.

A fresh virtualenv per test is too slow, so the training packages are made unimportable in
the child processes instead: a `sitecustomize` on PYTHONPATH puts a finder first on
sys.meta_path that refuses torch, scikit-learn, safetensors, tqdm and onnxscript exactly as a
missing package is refused (ModuleNotFoundError naming it). What runs there is what
`pip install ctr-serve` (no extras) can run.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib

import httpx
import pytest

from ctr.cli import TRAIN_ONLY
from tests.testing import free_port, tiny_package
from tests.service_support import REPO_ROOT, request_body, wait_ready

pytestmark = pytest.mark.slow

BLOCKER = '''
import sys

BLOCKED = {blocked!r}


class NoTrainingExtra:
    """Refuse the train extra's packages the way a missing package is refused."""

    def find_spec(self, name, path=None, target=None):
        top = name.split(".")[0]
        if top in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{top!r}}", name=top)
        return None


sys.meta_path.insert(0, NoTrainingExtra())
'''


@pytest.fixture(scope="module")
def base_env(tmp_path_factory) -> dict[str, str]:
    site = tmp_path_factory.mktemp("no_train_extra")
    (site / "sitecustomize.py").write_text(BLOCKER.format(blocked=set(TRAIN_ONLY)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("CTR_")}
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(REPO_ROOT)])
    return env


def ctr(env: dict[str, str], *argv: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ctr", *argv], capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=timeout)


def test_the_training_packages_are_really_unimportable_there(base_env):
    for module in TRAIN_ONLY:
        out = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, env=base_env, timeout=60)
        assert out.returncode != 0 and f"No module named '{module}'" in out.stderr, module


def test_base_install_verifies_and_serves_without_torch(base_env, synth_spec, synth_dir, tmp_path):
    repo = tmp_path / "models"
    pkg, _ = tiny_package(repo, "synth", 1, synth_spec, seed=1)
    verify = ctr(base_env, "export", "verify", str(pkg))
    assert verify.returncode == 0, verify.stderr
    assert json.loads(verify.stdout)["ok"] is True
    listed = ctr(base_env, "models", "list", "--repo", str(repo), "--json")
    assert listed.returncode == 0, listed.stderr

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "ctr", "serve", "--workers", "1", "--repo", str(repo), "--port", str(port),
         "--users", str(synth_dir / "users.parquet"), "--items", str(synth_dir / "items.parquet")],
        cwd=REPO_ROOT, env=base_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, url)
        r = httpx.post(url + "/score", json=request_body(synth_dir, 10), timeout=30)
        assert r.status_code == 200 and len(r.json()["scores"]) == 10
    finally:
        proc.terminate()
        out = proc.communicate(timeout=60)[0]
    assert "No module named" not in out, out[-3000:]


def test_base_install_loads_features_into_redis_without_torch(base_env, synth_dir, redis_url, redis_prefix):
    import redis

    out = ctr(base_env, "features", "load", "--table", str(synth_dir / "items.parquet"), "--entity", "item",
              "--redis", redis_url, "--prefix", redis_prefix)
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)["rows"]
    client = redis.Redis.from_url(redis_url)
    try:
        assert rows > 0 and sum(1 for _ in client.scan_iter(match=f"{redis_prefix}:item:*", count=1000)) == rows
    finally:
        client.close()


def test_training_commands_name_the_train_extra(base_env, synth_dir, tmp_path):
    commands = [
        ["train", "--spec", "synthetic", "--data", str(synth_dir), "--model", "dnn", "--out", str(tmp_path / "run")],
        ["export", "--run", str(tmp_path / "run"), "--repo", str(tmp_path / "models"), "--name", "m"],
        ["data", "synth", "--out", str(tmp_path / "data"), "--rows", "1000"],
        ["quickstart", "--workdir", str(tmp_path / "qs"), "--no-serve"],
    ]
    for argv in commands:
        out = ctr(base_env, *argv)
        assert out.returncode == 2, (argv, out.stderr[-2000:])
        lines = [line for line in out.stderr.splitlines() if line.strip()]
        assert lines[-1].startswith(f"ctr {argv[0]}: error: this command needs the training dependencies"), (argv, out.stderr[-2000:])
        assert "pip install 'ctr-serve[train]'" in lines[-1]
        assert "Traceback" not in out.stderr
    assert not (tmp_path / "qs").exists(), "the quickstart refuses before it makes anything"


def test_readme_quickstart_installs_the_train_extra_and_tests_the_dev_extra():
    from tests.test_readme import readme_commands

    quickstart, tests = readme_commands()
    assert re.search(r"pip install torch==\S+ -e '\.\[train\]'", quickstart), quickstart
    assert "-e '.[dev]'" in tests
    extras = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert "ctr-serve[train]" in extras["dev"]
