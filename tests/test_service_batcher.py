"""The batcher packs and splits rows across requests and returns each request its own rows."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from service.batcher import Batcher, Overloaded


def _row_ids(tokens: np.ndarray) -> np.ndarray:
    """A scoring function whose output identifies the row it came from."""
    return tokens[:, 0].astype(np.float32) + tokens[:, 1].astype(np.float32) / 1000.0


def _run(coro):
    return asyncio.run(coro)


@pytest.mark.parametrize("enabled", [True, False])
def test_every_request_gets_exactly_its_rows(enabled):
    async def main():
        with ThreadPoolExecutor(1) as ex:
            b = Batcher(_row_ids, ex, max_batch_rows=256, max_queue_delay_ms=3, max_queue_rows=10**7, enabled=enabled)
            b.start()
            rng = np.random.default_rng(0)
            sizes = rng.integers(1, 700, 300)  # some larger than a batch, so they are split

            async def one(req: int, n: int):
                await asyncio.sleep(float(rng.random()) * 0.01)
                tokens = np.stack([np.full(n, req), np.arange(n)], axis=1).astype(np.int64)
                out = await b.submit(tokens, time.monotonic() + 60)
                np.testing.assert_array_equal(out, _row_ids(tokens))
                return n

            done = await asyncio.gather(*(one(i, int(n)) for i, n in enumerate(sizes)))
            await b.drain()
            return done, b.stats

    done, stats = _run(main())
    assert sum(done) == stats.rows
    if enabled:
        assert stats.max_rows == 256  # packed up to a full batch
        unpacked = sum(-(-n // 256) for n in done)
        assert stats.batches < unpacked  # fewer runs than one-request-per-batch would need
    else:
        assert stats.batches == len(done)


def test_full_queue_rejects_at_once_and_accepted_rows_succeed():
    def slow(tokens: np.ndarray) -> np.ndarray:
        time.sleep(0.02)
        return _row_ids(tokens)

    async def main():
        with ThreadPoolExecutor(1) as ex:
            b = Batcher(slow, ex, max_batch_rows=100, max_queue_delay_ms=1, max_queue_rows=300)
            b.start()

            async def one(i: int):
                tokens = np.stack([np.full(100, i), np.arange(100)], axis=1).astype(np.int64)
                try:
                    out = await b.submit(tokens, time.monotonic() + 60)
                except Overloaded as exc:
                    return exc.reason
                np.testing.assert_array_equal(out, _row_ids(tokens))
                return "ok"

            results = await asyncio.gather(*(one(i) for i in range(20)))
            await b.drain()
            return results

    results = _run(main())
    assert results.count("ok") == 3 and results.count("queue_full") == 17


def test_expired_deadline_in_queue_is_rejected():
    def slow(tokens: np.ndarray) -> np.ndarray:
        time.sleep(0.05)
        return _row_ids(tokens)

    async def main():
        with ThreadPoolExecutor(1) as ex:
            b = Batcher(slow, ex, max_batch_rows=10, max_queue_delay_ms=0, max_queue_rows=1000)
            b.start()
            tok = np.zeros((10, 2), dtype=np.int64)
            first = asyncio.ensure_future(b.submit(tok, time.monotonic() + 60))
            await asyncio.sleep(0.005)  # the first batch is now running for 50 ms
            with pytest.raises(Overloaded) as info:
                await b.submit(tok, time.monotonic() + 0.001)
            await first
            await b.drain()
            return info.value.reason

    assert _run(main()) == "deadline"


def test_drain_finishes_accepted_requests_then_refuses():
    async def main():
        with ThreadPoolExecutor(1) as ex:
            b = Batcher(_row_ids, ex, max_batch_rows=64, max_queue_delay_ms=20)
            b.start()
            tok = np.ones((50, 2), dtype=np.int64)
            pending = [asyncio.ensure_future(b.submit(tok, time.monotonic() + 60)) for _ in range(5)]
            await asyncio.sleep(0)
            await b.drain()
            assert all(p.done() and not p.exception() for p in pending)
            with pytest.raises(Overloaded):
                await b.submit(tok, time.monotonic() + 60)

    _run(main())
