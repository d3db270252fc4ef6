"""Service settings (pydantic-settings): flags > CTR_* environment > config file > defaults,
nested keys with `__`, unknown keys refused by name; JSON log lines as an option."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys

import pytest

from model.logs import JsonFormatter, kv
from service.config import ServiceConfig, SettingsError, load_settings, with_default_variant
from tests.testing import tiny_package
from tests.service_support import REPO_ROOT, wait_ready


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """No CTR_ setting of the surrounding shell leaks into these tests."""
    for name in list(os.environ):
        if name.startswith("CTR_"):
            monkeypatch.delenv(name)


def write(path, data) -> str:
    if path.suffix in (".yaml", ".yml"):
        import yaml

        path.write_text(yaml.safe_dump(data))
    else:
        path.write_text(json.dumps(data))
    return str(path)


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_precedence_flags_over_env_over_file_over_defaults(tmp_path, monkeypatch, suffix):
    cfg_file = write(tmp_path / f"serve{suffix}", {
        "repo": "/from/file", "ab_salt": "file-salt", "reload_poll_s": 7,
        "batcher": {"max_batch_rows": 100, "max_queue_delay_ms": 3},
    })
    monkeypatch.setenv("CTR_REPO", "/from/env")
    monkeypatch.setenv("CTR_RELOAD_POLL_S", "9")
    monkeypatch.setenv("CTR_BATCHER__MAX_BATCH_ROWS", "2048")
    cfg = load_settings(cfg_file, repo="/from/flag", batcher__max_queue_delay_ms=None)
    assert cfg.repo == "/from/flag"  # flag > env > file
    assert cfg.reload_poll_s == 9  # env > file
    assert cfg.batcher.max_batch_rows == 2048  # nested env key, merged into the file's section
    assert cfg.batcher.max_queue_delay_ms == 3  # file (a flag left out is None: not given)
    assert cfg.ab_salt == "file-salt"
    assert cfg.batcher.max_queue_rows == ServiceConfig.model_fields["batcher"].default.max_queue_rows  # default
    flagged = load_settings(cfg_file, batcher__max_batch_rows=64)
    assert flagged.batcher.max_batch_rows == 64 and flagged.batcher.max_queue_delay_ms == 3  # nested flag > env


def test_config_file_from_ctr_config_and_lists_as_json(tmp_path, monkeypatch):
    monkeypatch.setenv("CTR_CONFIG", write(tmp_path / "c.yaml", {"features": {"prefix": "p1"}}))
    monkeypatch.setenv("CTR_SCORER__BUCKETS", "[64, 1, 512]")
    monkeypatch.setenv("CTR_VARIANTS", '[{"name": "a", "model": "m", "weight": 0.5}]')
    cfg = load_settings()
    assert cfg.features.prefix == "p1"
    assert cfg.scorer.buckets == [1, 64, 512]
    assert cfg.variants[0].name == "a" and cfg.variants[0].weight == 0.5


def test_unknown_keys_are_refused_with_the_valid_ones(tmp_path):
    cfg_file = write(tmp_path / "bad.yaml", {"batcher": {"max_batch_rowz": 1}, "colour": "red"})
    with pytest.raises(SettingsError) as err:
        load_settings(cfg_file)
    msg = str(err.value)
    assert "unknown key 'batcher.max_batch_rowz'" in msg and "valid keys under 'batcher': enabled, max_batch_rows" in msg
    assert "unknown key 'colour'" in msg and "valid keys at the top level: repo, variants" in msg
    assert "\n" not in msg and str(cfg_file) in msg


def test_a_nested_env_key_without_double_underscore_is_refused(monkeypatch):
    monkeypatch.setenv("CTR_BATCHER_MAX_BATCH_ROWS", "2048")
    with pytest.raises(SettingsError, match=r"CTR_BATCHER_MAX_BATCH_ROWS is not a setting: nested keys use '__' \(CTR_BATCHER__MAX_BATCH_ROWS\)"):
        load_settings()


def test_bad_values_name_their_key(monkeypatch):
    monkeypatch.setenv("CTR_BATCHER__MAX_BATCH_ROWS", "0")
    with pytest.raises(SettingsError, match=r"batcher\.max_batch_rows: Input should be greater than or equal to 1"):
        load_settings()


def test_a_missing_config_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such.yaml"):
        load_settings(str(tmp_path / "no-such.yaml"))


def test_ctr_serve_and_the_uvicorn_factory_read_the_same_settings(tmp_path, synth_spec, monkeypatch):
    """`ctr serve` (its flag parser and build_config) and `service.app:from_env` under one
    environment and one file end with the same settings."""
    from ctr.cli import build_parser
    from service.app import from_env
    from service.cli import build_config

    repo = tmp_path / "models"
    tiny_package(repo, "synth", 1, synth_spec)
    monkeypatch.setenv("CTR_CONFIG", write(tmp_path / "c.json", {"scorer": {"buckets": [1, 8], "warmup_runs": 1, "intra_op_threads": 1}}))
    monkeypatch.setenv("CTR_REPO", str(repo))
    monkeypatch.setenv("CTR_BATCHER__MAX_BATCH_ROWS", "64")
    monkeypatch.setenv("CTR_FEATURES__PREFIX", "shared")
    served = with_default_variant(build_config(build_parser().parse_args(["serve"])))
    app = from_env()
    factory = app.state.service.cfg
    skip = {"drain_grace_s"}  # `ctr serve` applies its documented drain default on top
    assert served.model_dump(exclude=skip) == factory.model_dump(exclude=skip)
    assert factory.batcher.max_batch_rows == 64 and factory.scorer.buckets == [1, 8] and factory.features.prefix == "shared"


def test_json_log_lines_carry_time_level_logger_event_and_fields():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("ctr.test.json")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    try:
        logger.warning("model_version_skipped %s", kv(variant="main", version=5, reason="checksum", error="a b"))
        logger.info("plain message %d", 3)
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            logger.exception("failed %s", kv(level="x"))
    finally:
        logger.removeHandler(handler)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    first = lines[0]
    assert first["level"] == "WARNING" and first["logger"] == "ctr.test.json" and first["event"] == "model_version_skipped"
    assert (first["variant"], first["version"], first["reason"], first["error"]) == ("main", 5, "checksum", "a b")
    assert first["time"].endswith("Z") and "T" in first["time"]
    assert lines[1]["event"] == "plain message 3"
    assert lines[2]["field_level"] == "x" and lines[2]["level"] == "ERROR" and "RuntimeError: boom" in lines[2]["exc"]
    assert str(kv(a=1, b="x y")) == "a=1 b='x y'"  # the text format is unchanged


def test_log_format_comes_from_the_flag_or_the_environment(tmp_path, synth_spec):
    """`ctr serve --log-format json` and CTR_LOG_FORMAT=json both give JSON lines; the flag
    wins over the environment. (A repository whose only version is corrupt: the service logs
    its warning and exits without starting a server.)"""
    repo = tmp_path / "models"
    pkg, _ = tiny_package(repo, "synth", 1, synth_spec)
    (pkg / "model.onnx").write_bytes(b"garbage" * 10)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CTR_")}
    serve = [sys.executable, "-m", "ctr", "serve", "--workers", "1", "--repo", str(repo)]
    cases = [
        (["--log-format", "json"], {}, True),
        ([], {"CTR_LOG_FORMAT": "json"}, True),
        (["--log-format", "text"], {"CTR_LOG_FORMAT": "json"}, False),
        ([], {}, False),
    ]
    for flags, extra, want_json in cases:
        out = subprocess.run([*serve, *flags], capture_output=True, text=True, cwd=REPO_ROOT, env={**env, **extra}, timeout=120)
        assert out.returncode == 1, out.stderr
        lines = [line for line in out.stderr.splitlines() if line.strip() and not line.startswith("ctr serve: error:")]
        warning = [line for line in lines if "model_version_skipped" in line]
        assert len(warning) == 1, out.stderr
        if want_json:
            records = [json.loads(line) for line in lines]  # every log line is one JSON object
            rec = next(r for r in records if r["event"] == "model_version_skipped")
            assert rec["level"] == "WARNING" and rec["version"] == 1 and rec["reason"] == "checksum"
        else:
            assert warning[0].split()[2:5] == ["WARNING", "service.registry", "model_version_skipped"], warning


def test_uvicorn_lines_follow_the_process_log_format():
    """With `log_config=uvicorn_log_config()`, uvicorn's own records reach the root handler."""
    code = (
        "import logging, uvicorn\n"
        "from model.logs import setup_logging, uvicorn_log_config\n"
        "setup_logging('INFO', 'json')\n"
        "uvicorn.Config(app=lambda *a: None, log_config=uvicorn_log_config(), log_level='info')\n"
        "logging.getLogger('uvicorn.error').info('Started server process [%d]', 42)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    (line,) = [line for line in out.stderr.splitlines() if line.strip()]
    rec = json.loads(line)
    assert rec["logger"] == "uvicorn.error" and rec["event"] == "Started server process [42]" and rec["level"] == "INFO"


def test_the_uvicorn_factory_serves_from_the_environment(tmp_path, synth_spec, synth_dir):
    """`uvicorn --factory service.app:from_env` configured only by CTR_* variables: it serves,
    and its log lines follow CTR_LOG_FORMAT=json."""

    import httpx

    from tests.service_support import request_body
    from tests.testing import free_port

    repo = tmp_path / "models"
    tiny_package(repo, "synth", 1, synth_spec)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CTR_")}
    env.update(CTR_REPO=str(repo), CTR_LOG_FORMAT="json", CTR_BATCHER__MAX_BATCH_ROWS="64",
               CTR_FEATURES__USERS_TABLE=str(synth_dir / "users.parquet"), CTR_FEATURES__ITEMS_TABLE=str(synth_dir / "items.parquet"))
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "--factory", "service.app:from_env", "--port", str(port)],
                            cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, url)
        r = httpx.post(url + "/score", json=request_body(synth_dir, 4), timeout=30)
        assert r.status_code == 200 and r.json()["version"] == 1
    finally:
        proc.terminate()
        out = proc.communicate(timeout=60)[0]
    records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    loaded = [r for r in records if r["event"] == "model_loaded"]
    assert loaded and loaded[0]["version"] == 1 and loaded[0]["logger"] == "service.registry", out[-3000:]
