"""Admission control: requests are shed before their body is read, and admitted ones succeed.

The rules are checked on `Admission` itself with a hand-driven clock; the overload test runs
`ctr serve` (real uvicorn, a real onnxruntime session, the embedded store) in its own process
and drives it past capacity with 200 concurrent clients of 500 items each. It proves the
shed path by the service's own counters (every parsed body is counted in
ctr_request_items), never by wall-clock asserts; the 503 latency share is printed.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import httpx
import numpy as np
import pytest

from service.admission import MIN_INFLIGHT, Admission
from service.errors import Overloaded
from tests.service_support import REPO_ROOT, metric_value, offline_scores, request_body, wait_ready
from tests.testing import free_port, tiny_package


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def admission(**kw) -> Admission:
    base = dict(max_inflight_requests=8, max_inflight_rows=1000, max_wait_s=0.5, max_items=1000, clock=Clock())
    return Admission(**(base | kw))


def test_request_limit_sheds_before_anything_else():
    adm = admission(max_inflight_requests=3)
    tickets = [adm.admit(100) for _ in range(3)]
    with pytest.raises(Overloaded) as err:
        adm.admit(100)
    assert err.value.reason == "inflight_requests" and err.value.status == 503 and err.value.headers["Retry-After"]
    tickets[0].close()
    tickets[0].close()  # closing twice gives back one slot, once
    assert adm.inflight_requests == 2
    adm.admit(100)


def test_rows_are_estimated_from_content_length_then_corrected():
    adm = admission(max_inflight_rows=300)
    adm.bytes_per_item = 20.0
    assert adm.estimate_rows(2000) == 100 and adm.estimate_rows(None) == 1000 and adm.estimate_rows(10**9) == 1000
    a, b = adm.admit(2000), adm.admit(2000)
    assert adm.inflight_rows == 200
    with pytest.raises(Overloaded) as err:
        adm.admit(4000)  # 200 + 200 > 300
    assert err.value.reason == "inflight_rows"
    a.set_rows(10)  # parsed: the body held 10 items, not 100
    c = adm.admit(3000)
    assert adm.inflight_rows == 10 + 100 + 150
    for t in (a, b, c):
        t.close()
    assert adm.inflight_rows == 0 and adm.inflight_requests == 0


def test_below_the_minimum_in_flight_a_request_is_always_admitted():
    adm = admission(max_inflight_rows=10, max_items=5000)
    tickets = [adm.admit(10**6) for _ in range(MIN_INFLIGHT)]  # each far over the row limit
    with pytest.raises(Overloaded):
        adm.admit(10**6)
    assert len(tickets) == MIN_INFLIGHT


def test_queue_wait_uses_the_rate_measured_at_capacity_only():
    clock = Clock()
    adm = admission(max_inflight_requests=50, max_inflight_rows=10**6, max_wait_s=0.5, clock=clock)
    adm.bytes_per_item = 10.0  # 1000 bytes: 100 rows
    # One request at a time measures its latency, not the capacity: no rate is learned.
    for _ in range(8):
        t = adm.admit(1000)
        clock.t += 0.125
        t.done = True
        t.close()
    assert adm.rate is None
    # Four in flight, one done every 1/16 s: 100 rows / 0.0625 s = 1600 rows/s at capacity.
    tickets = [adm.admit(1000) for _ in range(4)]
    for _ in range(16):
        clock.t += 0.0625
        t = tickets.pop(0)
        t.done = True
        t.close()
        tickets.append(adm.admit(1000))
    assert adm.rate == pytest.approx(1600)
    # 0.5 s at that rate is 800 rows ahead: five more 100-row requests find at most 800 rows
    # ahead of them, a sixth would wait longer.
    tickets += [adm.admit(1000) for _ in range(5)]
    assert adm.wait_estimate_s() == pytest.approx(900 / 1600)
    with pytest.raises(Overloaded) as err:
        adm.admit(1000)
    assert err.value.reason == "queue_wait"
    for t in tickets:
        t.close()


def test_a_request_timing_out_in_the_queue_halves_the_row_limit():
    adm = admission(max_inflight_rows=1000)
    adm.bytes_per_item = 10.0
    t = adm.admit(1000)
    t.expired = True
    t.close()
    assert adm.row_limit == 500
    held = [adm.admit(2000) for _ in range(2)]  # 400 rows: the minimum in flight is admitted
    with pytest.raises(Overloaded) as err:
        adm.admit(2000)  # 600 > 500
    assert err.value.reason == "inflight_rows"
    for t in held:
        t.done = True
        t.close()
    assert adm.row_limit == 500 + 2 * 0.1 * 200
    for _ in range(100):
        t = adm.admit(2000)
        t.done = True
        t.close()
    assert adm.row_limit == 1000  # grown back, never past max_inflight_rows


def test_the_adaptive_limit_and_rate_are_reported_when_they_move():
    """The service exports these as gauges: a shrunken row limit explains a wave of 503s."""
    now = [0.0]
    adm = admission(max_inflight_rows=1000)
    adm.clock = lambda: now[0]
    adm.bytes_per_item = 10.0
    seen: list[tuple[float, float | None]] = []
    adm.on_change = lambda limit, rate: seen.append((limit, rate))
    t = adm.admit(1000)
    t.expired = True
    t.close()
    assert seen == [(500.0, None)]
    held = [adm.admit(1000) for _ in range(3)]
    now[0] = 0.5  # three requests in flight for half a second: a capacity window
    held[0].done = True
    held[0].close()
    assert seen[-1] == (510.0, pytest.approx(100 / 0.5))
    n = len(seen)
    held[1].close()  # neither done nor expired: nothing moved, nothing reported
    assert len(seen) == n
    held[2].close()


def test_bytes_per_item_follows_the_parsed_bodies():
    adm = admission()
    for _ in range(200):
        adm.learn_body(25_000, 1000)
    assert adm.bytes_per_item == pytest.approx(25.0, rel=0.01)


# ---------------------------------------------------------------- under real overload
async def _drive(url: str, bodies: list[bytes], clients: int, per_client: int) -> list[tuple[int, str | None, int]]:
    """`clients` connections, each sending `per_client` bodies back to back."""
    out: list[tuple[int, str | None, int]] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as c:

        async def client(k: int) -> None:
            for j in range(per_client):
                i = (k * per_client + j) % len(bodies)
                r = await c.post("/score", content=bodies[i], headers={"content-type": "application/json"})
                out.append((r.status_code, r.headers.get("retry-after"), i))

        await asyncio.gather(*(client(k) for k in range(clients)))
    return out


@pytest.mark.slow
def test_overload_is_shed_before_parsing_and_admitted_requests_succeed(synth_spec, synth_dir, tmp_path):
    _, weights = tiny_package(tmp_path / "models", "synth", 1, synth_spec, seed=1)
    port = free_port()
    cfg = tmp_path / "serve.json"
    cfg.write_text(json.dumps({"scorer": {"intra_op_threads": 1, "warmup_runs": 1}, "limits": {"max_inflight_rows": 4000}}))
    cmd = [sys.executable, "-m", "ctr.cli", "serve", "--repo", str(tmp_path / "models"), "--model", "synth", "--config", str(cfg),
           "--port", str(port), "--workers", "1", "--providers", "CPUExecutionProvider", "--log-level", "WARNING",
           "--users", str(synth_dir / "users.parquet"), "--items", str(synth_dir / "items.parquet")]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, url)
        dicts = [request_body(synth_dir, n_items=500, user_index=i, seed=i) for i in range(20)]
        bodies = [json.dumps(d).encode() for d in dicts]
        results = asyncio.run(_drive(url, bodies, clients=200, per_client=3))
        metrics = httpx.get(url + "/metrics").text
        codes = [s for s, _, _ in results]
        assert set(codes) <= {200, 503}, sorted(set(codes))
        assert codes.count(503) > 0 and codes.count(200) > 0, (codes.count(200), codes.count(503))
        assert all(ra == "1" for s, ra, _ in results if s == 503)
        # Every 503 came from admission control, before its body was parsed ...
        parsed = metric_value(metrics, "ctr_request_items_count")
        assert parsed == codes.count(200), (parsed, codes.count(200))
        shed = {r: metric_value(metrics, "ctr_rejected_total", reason=r) for r in ("inflight_requests", "inflight_rows", "queue_wait")}
        assert sum(shed.values()) == codes.count(503), shed
        # ... and every admitted request was scored, none timed out in the queue.
        assert metric_value(metrics, "ctr_rejected_total", reason="deadline") == 0
        assert metric_value(metrics, "ctr_rejected_total", reason="queue_full") == 0
        good = next(i for s, _, i in results if s == 200)
        r = httpx.post(url + "/score", content=bodies[good], headers={"content-type": "application/json"}, timeout=30)
        np.testing.assert_allclose(r.json()["scores"], offline_scores(synth_spec, weights, synth_dir, dicts[good]), atol=1e-6)
        # The adaptive limit is visible: shedding moved it off the configured bound, never above it.
        assert 0 < metric_value(metrics, "ctr_admission_row_limit") <= 4000
        fast = metric_value(metrics, "ctr_request_seconds_bucket", status="503", le="0.05")
        total = metric_value(metrics, "ctr_request_seconds_count", status="503")
        print(f"\n200: {codes.count(200)}  503: {codes.count(503)} {shed}  503s within 50 ms: {fast / total:.1%}")
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
