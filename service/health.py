"""Liveness, readiness and drain state.

Liveness only says the process answers; restarting a pod because Redis is down would make
things worse. Readiness is the load balancer's question, "send me traffic?": only when every
variant is loaded and warm, the feature store answers and the service is not draining.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Lifecycle:
    warmed: bool = False
    draining: bool = False

    def begin_drain(self) -> None:
        self.draining = True
