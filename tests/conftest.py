"""Shared fixtures: real Redis, small synthetic datasets and fitted specs."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.redis_servers import RedisProcess, shared_redis_url

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    url, proc = shared_redis_url()
    yield url
    if proc:
        proc.stop()


@pytest.fixture()
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A key prefix no other test or user owns; only its keys are deleted afterwards."""
    import redis

    prefix = f"ctrtest-{uuid.uuid4().hex[:12]}"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture()
def private_redis() -> Iterator[RedisProcess]:
    """A redis-server of this test's own, which it may stop and restart."""
    proc = RedisProcess().start()
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic dataset shared by the session (deterministic, seed 11)."""
    from model.synth import SynthConfig, synthesize

    out = tmp_path_factory.mktemp("synth")
    synthesize(SynthConfig(seed=11, rows=20_000, users=800, items=400), out)
    return out


@pytest.fixture(scope="session")
def synth_spec(synth_dir: Path):
    from model.readers import load_splits
    from model.spec import FeatureSpec

    return FeatureSpec.load("synthetic").fit(load_splits(synth_dir, ("train",))["train"])


@pytest.fixture(scope="session")
def frappe_dir() -> Path:
    d = SHARED_DATA / "frappe_x1"
    if not (d / "train.csv").exists():
        pytest.skip(f"Frappe data not found at {d}")
    return d
