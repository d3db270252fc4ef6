"""Liveness, readiness and drain state.

Liveness only says the process answers; restarting a pod because Redis is down would make
things worse. Readiness is the load balancer's question, "send me traffic?": only when every
variant is loaded and warm, every readiness check passes (the feature store answers, and
whatever else was registered in `Service.checks`) and the service is not draining.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from service.app import Service

Check = Callable[[], Awaitable[bool]]


@dataclass
class Lifecycle:
    warmed: bool = False
    draining: bool = False

    def begin_drain(self) -> None:
        self.draining = True


async def readiness(svc: "Service") -> tuple[bool, dict[str, Any]]:
    """(ready, the body /readyz shows): every check runs concurrently, each one bounded."""
    names = list(svc.checks)
    results = await asyncio.gather(*(_run(svc.checks[n]) for n in names))
    checks = dict(zip(names, results))
    life = svc.lifecycle
    ready = life.warmed and not life.draining and bool(svc.registry.models) and all(checks.values())
    body = {"ready": ready, "warmed": life.warmed, **checks, "draining": life.draining, "models": svc.registry.describe()}
    return ready, body


async def _run(check: Check) -> bool:
    try:
        return bool(await check())
    except Exception:  # a failing check means "not ready", never a 500 from the probe
        return False
