"""Shared pieces for the service tests (not collected: the name does not start with test_)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import pytest

from model.spec import FeatureSpec
from service.config import ServiceConfig, load_config
from tests.testing import tiny_reference


def config(repo: Path, synth_dir: Path | None = None, **over: Any) -> ServiceConfig:
    base: dict[str, Any] = {
        "repo": str(repo),
        "variants": [{"name": "main", "model": "synth"}],
        "scorer": {"buckets": [1, 16, 128, 512], "intra_op_threads": 1, "warmup_runs": 1},
        "batcher": {"max_batch_rows": 512, "max_queue_delay_ms": 2},
    }
    if synth_dir is not None:
        base["features"] = {"users_table": str(synth_dir / "users.parquet"), "items_table": str(synth_dir / "items.parquet")}
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            base[k] = {**base[k], **v}
        else:
            base[k] = v
    return load_config(None, **base)


def request_body(synth_dir: Path, n_items: int = 20, user_index: int = 3, seed: int = 0) -> dict[str, Any]:
    users = pd.read_parquet(synth_dir / "users.parquet")
    items = pd.read_parquet(synth_dir / "items.parquet")
    rng = np.random.default_rng(seed)
    picked = items["item_id"].to_numpy()[rng.choice(len(items), n_items, replace=n_items > len(items))]
    return {
        "request_id": f"r{seed}",
        "user_id": str(users["user_id"].iloc[user_index]),
        "context": {"device": "ios", "hour": 9},
        "items": [{"item_id": str(i)} for i in picked],
    }


def offline_scores(spec: FeatureSpec, reference: Any, synth_dir: Path, body: dict[str, Any]) -> np.ndarray:
    """The same rows built the offline way: join the tables into one DataFrame and encode.

    `reference` is an `export.offline_scorer.OfflineScorer` (a trained package: its own spec
    encodes) or the weights of a `tests.testing.tiny_package` model.
    """
    users = pd.read_parquet(synth_dir / "users.parquet").set_index("user_id")
    items = pd.read_parquet(synth_dir / "items.parquet").set_index("item_id")
    rows = []
    for it in body["items"]:
        row: dict[str, Any] = {"user_id": body["user_id"], "item_id": it["item_id"]}
        if body["user_id"] in users.index:
            row.update(users.loc[body["user_id"]].to_dict())
        if it["item_id"] in items.index:
            row.update(items.loc[it["item_id"]].to_dict())
        row.update(body.get("context", {}))
        row.update(it.get("features") or {})
        rows.append(row)
    if hasattr(reference, "score_rows"):
        return np.asarray(reference.score_rows(pd.DataFrame(rows)), dtype=np.float64)
    return tiny_reference(reference, spec.encode(pd.DataFrame(rows), strict=False))


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels` (0 when absent)."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        metric, _, lab = head.partition("{")
        if metric != name:
            continue
        if all(f'{k}="{v}"' in lab for k, v in labels.items()):
            total += float(value)
    return total


async def fire(url: str, bodies: list[dict[str, Any]], concurrency: int = 16, timeout: float = 30.0) -> list[httpx.Response]:
    """Send bodies with bounded concurrency; returns the responses in body order."""
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:

        async def one(b: dict[str, Any]) -> httpx.Response:
            async with sem:
                return await client.post("/score", json=b)

        return await asyncio.gather(*(one(b) for b in bodies))


REPO_ROOT = Path(__file__).resolve().parent.parent

# A real training run, as small as still trains: DGenCTR (both stages), 1 epoch each, width 8.
TINY_TRAIN = ["--model", "dgenctr", "--epochs", "1", "--pretrain-epochs", "1", "--max-rows", "4000", "--batch-size", "512",
              "--d-model", "8", "--layers", "1", "--heads", "2", "--no-progress", "--threads", "1"]


def train_and_export(data_dir: Path, work: Path, name: str = "synth") -> Path:
    """`ctr train` then `ctr export`, run as the CLI runs them; returns the published package.

    Child processes keep torch out of the test process, exactly as in production, where the
    service never imports it.
    """
    import subprocess
    import sys

    run, repo = work / "run", work / "models"
    for argv in (
        ["train", "--spec", "synthetic", "--data", str(data_dir), "--out", str(run), *TINY_TRAIN],
        ["export", "--run", str(run), "--repo", str(repo), "--name", name],
    ):
        out = subprocess.run([sys.executable, "-m", "ctr", *argv], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
        if out.returncode != 0:
            raise RuntimeError(f"ctr {argv[0]} failed: {out.stderr[-3000:]}")
    return repo / name / "1"


@pytest.fixture(scope="session")
def trained_package(synth_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny real DGenCTR run exported with the exporter (MODELS/synth/1), once per session."""
    return train_and_export(synth_dir, tmp_path_factory.mktemp("trained"))


def wait_ready(proc: Any, url: str, timeout_s: float = 120.0) -> None:
    """Until the server process at `url` answers /readyz 200; fails with its output if it exits."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}: {proc.communicate()[0]}")
        assert time.monotonic() < deadline, f"{url} not ready after {timeout_s:.0f} s"
        time.sleep(0.2)


def offline_rows(synth_dir: Path, body: dict[str, Any]) -> list[dict[str, Any]]:
    """Raw rows joined the offline way (tables + request), as a batch job would build them."""
    users = pd.read_parquet(synth_dir / "users.parquet").set_index("user_id")
    items = pd.read_parquet(synth_dir / "items.parquet").set_index("item_id")
    rows = []
    for it in body["items"]:
        row = {"user_id": body["user_id"], "item_id": it["item_id"]}
        if body["user_id"] in users.index:
            row.update(users.loc[body["user_id"]].to_dict())
        if it["item_id"] in items.index:
            row.update(items.loc[it["item_id"]].to_dict())
        row.update(body["context"])
        row.update(it.get("features") or {})
        rows.append(row)
    return rows
