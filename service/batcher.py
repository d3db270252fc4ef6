"""Dynamic batching of rows across requests (Triton semantics, counted in rows).

A request's rows join one queue. The collector starts a batch when `max_batch_rows` rows wait
or the oldest row has waited `max_queue_delay_ms`, whichever comes first; while onnxruntime is
busy the queue fills, so batches grow with load without any tuning. A request larger than a
batch is split across batches and reassembled; small requests are packed together. Each
request owns an output array that only its own slices are written into, so it gets exactly
its own rows back. The queue is bounded in rows: a request that does not fit is refused at
once (the caller retries elsewhere, which beats queueing past its deadline), and one whose
deadline passes before any of its rows ran is dropped with 503 too.

onnxruntime runs on a small thread pool: it releases the GIL, so the event loop keeps
parsing requests and fetching features while a batch runs.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np

ScoreFn = Callable[[np.ndarray], np.ndarray]


class Overloaded(Exception):
    """Answered as 503 with Retry-After; `reason` is the ctr_rejected_total label."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class _Pending:
    tokens: np.ndarray
    future: asyncio.Future
    deadline: float
    enqueued: float
    out: np.ndarray
    taken: int = 0  # rows handed to batches so far
    left: int = 0  # rows not yet scored
    started: bool = False


@dataclass
class BatchStats:
    batches: int = 0
    rows: int = 0
    max_rows: int = 0


@dataclass
class Batcher:
    score_fn: ScoreFn
    executor: Executor
    max_batch_rows: int = 1024
    max_queue_delay_ms: float = 2.0
    max_queue_rows: int = 20_000
    workers: int = 1
    enabled: bool = True
    on_batch: Callable[[int, float], None] | None = None  # (rows, inference seconds)
    on_dispatch: Callable[[float], None] | None = None  # queue wait seconds of a request
    stats: BatchStats = field(default_factory=BatchStats)
    _queue: deque = field(default_factory=deque, init=False)
    _queued_rows: int = field(default=0, init=False)
    _inflight_rows: int = field(default=0, init=False)
    _arrived: asyncio.Event | None = field(default=None, init=False)
    _slots: asyncio.Semaphore | None = field(default=None, init=False)
    _task: asyncio.Task | None = field(default=None, init=False)
    _running: set = field(default_factory=set, init=False)
    _closed: bool = field(default=False, init=False)

    def start(self) -> None:
        self._arrived = asyncio.Event()
        self._slots = asyncio.Semaphore(self.workers)
        if self.enabled:
            self._task = asyncio.get_running_loop().create_task(self._collect(), name="batcher")

    @property
    def queued_rows(self) -> int:
        return self._queued_rows

    @property
    def inflight_rows(self) -> int:
        return self._inflight_rows

    async def submit(self, tokens: np.ndarray, deadline: float) -> np.ndarray:
        """Scores for `tokens` in row order; raises Overloaded('queue_full'|'deadline')."""
        n = int(tokens.shape[0])
        if self._closed:
            raise Overloaded("draining")
        if self._inflight_rows + n > self.max_queue_rows:
            raise Overloaded("queue_full")
        self._inflight_rows += n
        try:
            if not self.enabled:
                return await self._direct(tokens, deadline)
            loop = asyncio.get_running_loop()
            p = _Pending(tokens, loop.create_future(), deadline, time.monotonic(), np.empty(n, np.float32), left=n)
            self._queue.append(p)
            self._queued_rows += n
            assert self._arrived is not None
            self._arrived.set()
            return await p.future
        finally:
            self._inflight_rows -= n

    async def _direct(self, tokens: np.ndarray, deadline: float) -> np.ndarray:
        """Batching off: one onnxruntime call per request (the benchmark's baseline)."""
        assert self._slots is not None
        t0 = time.monotonic()
        async with self._slots:
            if time.monotonic() > deadline:
                raise Overloaded("deadline")
            if self.on_dispatch:
                self.on_dispatch(time.monotonic() - t0)
            probs, seconds = await asyncio.get_running_loop().run_in_executor(self.executor, _timed, self.score_fn, tokens)
        self._record(tokens.shape[0], seconds)
        return probs

    async def _collect(self) -> None:
        assert self._arrived is not None and self._slots is not None
        delay = self.max_queue_delay_ms / 1000.0
        while True:
            while not self._queue:
                if self._closed:
                    return
                self._arrived.clear()
                await self._arrived.wait()
            await self._slots.acquire()
            # Wait for a full batch or for the oldest request's delay, whichever is first.
            while self._queue and self._queued_rows < self.max_batch_rows and not self._closed:
                remaining = self._queue[0].enqueued + delay - time.monotonic()
                if remaining <= 0:
                    break
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), remaining)
                except TimeoutError:
                    break
            parts = self._take()
            if not parts:
                self._slots.release()
                continue
            task = asyncio.get_running_loop().create_task(self._run(parts))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    def _take(self) -> list[tuple[_Pending, int, int]]:
        """Pop up to max_batch_rows rows off the queue head, splitting a large request."""
        now = time.monotonic()
        parts: list[tuple[_Pending, int, int]] = []
        space = self.max_batch_rows
        while self._queue and space > 0:
            p = self._queue[0]
            if not p.started and (p.deadline < now or p.future.done()):
                self._queue.popleft()
                self._queued_rows -= p.tokens.shape[0]
                if not p.future.done():
                    p.future.set_exception(Overloaded("deadline"))
                continue
            if not p.started:
                p.started = True
                if self.on_dispatch:
                    self.on_dispatch(now - p.enqueued)
            take = min(space, p.tokens.shape[0] - p.taken)
            parts.append((p, p.taken, p.taken + take))
            p.taken += take
            space -= take
            self._queued_rows -= take
            if p.taken == p.tokens.shape[0]:
                self._queue.popleft()
        return parts

    async def _run(self, parts: list[tuple[_Pending, int, int]]) -> None:
        assert self._slots is not None
        try:
            if len(parts) == 1:
                p, a, b = parts[0]
                batch = p.tokens[a:b]
            else:
                batch = np.concatenate([p.tokens[a:b] for p, a, b in parts])
            try:
                probs, seconds = await asyncio.get_running_loop().run_in_executor(self.executor, _timed, self.score_fn, batch)
            except Exception as exc:  # a failed run fails exactly the requests in it
                for p, _, _ in parts:
                    if not p.future.done():
                        p.future.set_exception(exc)
                return
            self._record(batch.shape[0], seconds)
            offset = 0
            for p, a, b in parts:
                p.out[a:b] = probs[offset : offset + (b - a)]
                offset += b - a
                p.left -= b - a
                if p.left == 0 and not p.future.done():
                    p.future.set_result(p.out)
        finally:
            self._slots.release()

    def _record(self, rows: int, seconds: float) -> None:
        self.stats.batches += 1
        self.stats.rows += rows
        self.stats.max_rows = max(self.stats.max_rows, rows)
        if self.on_batch:
            self.on_batch(rows, seconds)

    async def drain(self, timeout_s: float = 30.0) -> None:
        """Stop taking requests, finish every accepted one, then stop the collector."""
        self._closed = True
        if self._arrived is not None:
            self._arrived.set()
        end = time.monotonic() + timeout_s
        while (self._inflight_rows or self._running) and time.monotonic() < end:
            await asyncio.sleep(0.005)
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass


def _timed(fn: ScoreFn, tokens: np.ndarray) -> tuple[np.ndarray, float]:
    t0 = time.perf_counter()
    out = fn(tokens)
    return out, time.perf_counter() - t0
