"""Deadlines for feature-store reads that count the store's time, not the event loop's.

A plain `asyncio.timeout(50 ms)` around a Redis read fires whenever the loop is busy for 50 ms:
the reply sits in the socket while the loop parses other requests, and when the loop finally
gets round to it, the timer and the reply become ready in the same pass and the timer may run
first (which one wins depends on the loop: asyncio runs ready I/O callbacks before expired
timers but the task's wake-up after both; uvloop runs timers before polling I/O). Under CPU
pressure that turned a healthy Redis into ~7% degraded answers.

So a `ReplyDeadline` does not cancel at `timeout_s` after the send: at that moment it looks at
how late the loop is running (`LoopLag`, the lateness of a 5 ms heartbeat timer, and of this
check itself) and waits two of those lags (plus 1 ms) more, long enough for any reply that
reached the socket in time to be read first, and only then cancels. A store that is really
frozen still fails, `timeout_s` plus twice the loop's lag after the send (capped at
`MAX_GRACE_S`).
"""

from __future__ import annotations

import asyncio
from typing import Any

MAX_GRACE_S = 1.0


class LoopLag:
    """How late the event loop runs its timers: the heartbeat's lateness, decaying per beat."""

    def __init__(self, period_s: float = 0.005, decay: float = 0.8) -> None:
        self.period_s = period_s
        self.decay = decay
        self.lag = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._due = 0.0

    def ensure_running(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._loop is loop and self._handle is not None:
            return
        self.stop()
        self._loop = loop
        self._due = loop.time() + self.period_s
        self._handle = loop.call_at(self._due, self._beat)

    def _beat(self) -> None:
        loop = self._loop
        assert loop is not None
        now = loop.time()
        self.lag = max(now - self._due, self.lag * self.decay)
        if loop.is_closed():
            self._handle = None
            return
        self._due = now + self.period_s
        self._handle = loop.call_at(self._due, self._beat)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._handle = None
        self._loop = None


class ReplyDeadline:
    """`async with ReplyDeadline(timeout_s, lag):` raises TimeoutError only when the reply is
    late by the store's clock (see the module docstring). Enter it right before the send."""

    __slots__ = ("timeout_s", "lag", "_cm", "_due", "_handle", "_loop")

    def __init__(self, timeout_s: float, lag: LoopLag) -> None:
        self.timeout_s = timeout_s
        self.lag = lag

    async def __aenter__(self) -> "ReplyDeadline":
        self._loop = loop = asyncio.get_running_loop()
        self.lag.ensure_running(loop)
        self._cm = asyncio.timeout(None)  # the stdlib does the cancelling (and uncancelling)
        await self._cm.__aenter__()
        self._due = loop.time() + self.timeout_s
        self._handle = loop.call_at(self._due, self._check)
        return self

    def _check(self) -> None:
        now = self._loop.time()
        grace = min(2.0 * max(self.lag.lag, now - self._due) + 0.001, MAX_GRACE_S)
        self._cm.reschedule(now + grace)

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> bool | None:
        self._handle.cancel()
        return await self._cm.__aexit__(exc_type, exc, tb)
