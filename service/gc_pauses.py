"""Keep CPython's cyclic garbage collector off the request path's tail.

A loaded service holds ~100k long-lived container objects (FastAPI, pydantic, pandas, the
feature spec, caches). CPython's full (generation 2) collection walks all of them, which on
the reference machine takes 25-100 ms, and it runs every few seconds under load because
every request allocates. Every request in flight during that pause waits for it, which is
what put the batched p99 at ~55 ms while p50 stayed at ~5 ms.

After warm-up we collect once and `gc.freeze()` the survivors: they move to a permanent
generation that later collections skip. Reference counting still frees frozen objects that
are not in cycles, so a retired model version is still released after a hot swap. A
callback times every collection into `ctr_gc_pause_seconds{generation}`, so the effect is
visible in production, not only in a benchmark.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections import deque
from typing import Any

from model.logs import kv

log = logging.getLogger("service")


def freeze_heap(collect: bool = True) -> int:
    """Move every live object to the permanent generation; returns how many are frozen.

    `collect=True` first runs a full collection (start-up, before ready) so garbage is not
    frozen with the live objects; after a hot reload we freeze without collecting, because a
    full collection would be exactly the pause this module exists to avoid.
    """
    if collect:
        gc.collect()
    gc.freeze()
    n = gc.get_freeze_count()
    log.info("gc_frozen %s", kv(objects=n, collected=collect))
    return n


class GcPauseTimer:
    """Times each collection into a histogram labelled by generation.

    gc callbacks run on whichever thread triggered the collection, with the GIL held, in the
    middle of whatever that thread was doing. In prometheus_client's multiprocess mode
    (`ctr serve --workers N`) every value update takes one process-wide, non-reentrant lock,
    and allocates while holding it; a collection triggered there ran this callback, whose
    update waited for the lock its own thread held, and the worker hung. So with
    multiprocess mode the callback only queues the pause, and the event loop moves the queue
    into the histogram every FLUSH_S (and at uninstall). A start/stop pair per collection
    costs well under a microsecond next to the collection itself.
    """

    FLUSH_S = 0.5

    def __init__(self, histogram: Any, defer: bool | None = None) -> None:
        from service.metrics import multiprocess_dir

        self._children = [histogram.labels(str(g)) for g in range(3)]
        self._start = 0.0
        self._installed = False
        self._defer = multiprocess_dir() is not None if defer is None else defer
        self._pending: deque[tuple[int, float]] = deque()
        self._timer: asyncio.TimerHandle | None = None

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        elif self._defer:
            self._pending.append((info["generation"], time.perf_counter() - self._start))
        else:
            self._children[info["generation"]].observe(time.perf_counter() - self._start)

    def flush(self) -> None:
        while self._pending:
            generation, seconds = self._pending.popleft()
            self._children[generation].observe(seconds)

    def _tick(self) -> None:
        self.flush()
        self._timer = asyncio.get_running_loop().call_later(self.FLUSH_S, self._tick)

    def install(self) -> None:
        if not self._installed:
            gc.callbacks.append(self)
            self._installed = True
            if self._defer:
                try:
                    self._timer = asyncio.get_running_loop().call_later(self.FLUSH_S, self._tick)
                except RuntimeError:  # no loop: flushed at uninstall
                    pass

    def uninstall(self) -> None:
        if self._installed:
            gc.callbacks.remove(self)
            self._installed = False
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self.flush()
