"""Property-based fuzz of the published OpenAPI schema against real uvicorn and onnxruntime.

schemathesis generates requests from the schema (and mutates them past it), sends each to the
running service over loopback and checks every answer: never a 5xx, only statuses the schema
documents, bodies and content types as documented. An input that reaches a 500, or a status
missing from the schema, fails here before a client finds it. The service's own request
metric proves how many cases reached POST /score.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from service.app import create_app
from tests.service_support import config, trained_package  # noqa: F401
from tests.testing import ServerThread

MIN_SCORE_CASES = 1000
CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,response_headers_conformance"


def _schemathesis() -> list[str]:
    exe = Path(sys.executable).with_name("schemathesis")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("schemathesis")
    if not found:
        pytest.skip("schemathesis is not installed (pip install -e '.[dev]')")
    return [found]


def _score_requests(url: str) -> float:
    text = httpx.get(url + "/metrics").text
    total = 0.0
    for line in text.splitlines():
        if line.startswith("ctr_request_seconds_count{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.mark.slow
def test_no_generated_input_gets_a_5xx_and_every_answer_is_documented(trained_package, synth_dir, tmp_path):
    repo = trained_package.parent.parent
    with ServerThread(create_app(config(repo, synth_dir))) as srv:
        before = _score_requests(srv.url)
        run = subprocess.run(
            [*_schemathesis(), "run", srv.url + "/openapi.json", "--checks", CHECKS, "--max-examples", "1100",
             "--seed", "20261202", "--request-timeout", "30", "--include-path", "/score",
             "--report", "ndjson", "--report-dir", str(tmp_path / "report")],
            cwd=tmp_path, capture_output=True, text=True, timeout=1500,
        )
        assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
        score_cases = _score_requests(srv.url) - before
        text = httpx.get(srv.url + "/metrics").text
        server_errors = sum(float(l.rsplit(" ", 1)[1]) for l in text.splitlines() if l.startswith("ctr_request_seconds_count{") and 'status="5' in l and 'status="503"' not in l)
    print(run.stdout[-1500:])
    assert score_cases >= MIN_SCORE_CASES, (score_cases, run.stdout[-2000:])
    assert server_errors == 0


@pytest.mark.slow
def test_the_other_routes_fuzz_clean(trained_package, synth_dir, tmp_path):
    repo = trained_package.parent.parent
    with ServerThread(create_app(config(repo, synth_dir))) as srv:
        run = subprocess.run(
            [*_schemathesis(), "run", srv.url + "/openapi.json", "--checks", CHECKS, "--max-examples", "100",
             "--seed", "20261202", "--request-timeout", "30", "--exclude-path", "/score"],
            cwd=tmp_path, capture_output=True, text=True, timeout=900,
        )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
