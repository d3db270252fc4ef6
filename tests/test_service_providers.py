"""onnxruntime providers: a GPU provider is asked for only when it can load, so a CPU host
starts with no CUDA error and one INFO line naming the provider in use."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.testing import tiny_package
from tests.service_support import REPO_ROOT

ORT_NOISE = ("libonnxruntime_providers_cuda", "[E:onnxruntime", "Failed to create CUDAExecutionProvider")

CHOOSE = """
import json, logging
from model.logs import setup_logging
setup_logging("INFO")
from service.providers import choose_providers, cuda_devices
first = choose_providers(["CUDAExecutionProvider", "CPUExecutionProvider"])
again = choose_providers(["CUDAExecutionProvider", "CPUExecutionProvider"])
print(json.dumps({"providers": first, "again": again, "devices": cuda_devices()[0]}))
"""


def test_providers_are_chosen_quietly_and_logged_once():
    out = subprocess.run([sys.executable, "-c", CHOOSE], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["providers"] == got["again"] and got["providers"][-1] == "CPUExecutionProvider"
    if got["devices"] == 0:
        assert got["providers"] == ["CPUExecutionProvider"]
    assert not [n for n in ORT_NOISE if n in out.stderr], out.stderr
    lines = [line for line in out.stderr.splitlines() if "onnxruntime_providers" in line]
    assert len(lines) == 1 and " INFO " in lines[0] and f"provider={got['providers'][0]}" in lines[0], out.stderr


PROBE = """
from service.providers import _probe
loaded, why = _probe(("CUDAExecutionProvider",))
print(sorted(loaded), why)
"""


def test_the_gpu_probe_itself_prints_nothing():
    """On an onnxruntime-gpu without the CUDA libraries, a plain session logs the red error;
    the probe's session must not."""
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("this onnxruntime build has no CUDA provider to probe")
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert not [n for n in ORT_NOISE if n in out.stderr + out.stdout], out.stderr


def test_building_the_served_app_prints_no_cuda_error(synth_spec, tmp_path):
    """`ctr serve`'s settings and app, built in a fresh process: the model's session is opened
    there, with one INFO line naming the provider and, on a CPU host, no CUDA error. (The full
    `ctr serve` start is checked the same way in test_service_startup.)"""
    from service.providers import cuda_devices

    repo = tmp_path / "models"
    tiny_package(repo, "synth", 1, synth_spec)
    code = (
        "from service.app import create_app\n"
        "from service.cli import build_config\n"
        "from ctr.cli import build_parser\n"
        "from model.logs import setup_logging\n"
        "setup_logging('INFO')\n"
        f"app = create_app(build_config(build_parser().parse_args(['serve', '--repo', {str(repo)!r}])))\n"
        "print('built', app.state.service.registry._chosen)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert not [n for n in ORT_NOISE if n in out.stderr], out.stderr
    chosen = [line for line in out.stderr.splitlines() if "onnxruntime_providers" in line]
    assert len(chosen) == 1 and " INFO " in chosen[0], out.stderr
    if cuda_devices()[0] == 0:
        assert "provider=CPUExecutionProvider" in chosen[0] and "scorer_fallback" not in out.stderr
