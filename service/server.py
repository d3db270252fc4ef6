"""Running the app under uvicorn with a graceful drain on SIGTERM.

Kubernetes sends SIGTERM and, at the same time, starts removing the pod from its endpoints;
for a moment traffic still arrives. So the first SIGTERM only flips readiness to false and
keeps serving for `drain_grace_s`; then uvicorn stops accepting, waits for every accepted
request (which waits on the batcher queue), runs the lifespan shutdown and exits 0. A second
signal exits at once.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import uvicorn

from model.logs import kv

log = logging.getLogger("service")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, drain_grace_s: float = 0.0) -> None:
        super().__init__(config)
        self.drain_grace_s = drain_grace_s
        self._signalled = False

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self._signalled:
            self.force_exit = True
            return super().handle_exit(sig, frame)
        self._signalled = True
        app = self.config.loaded_app if self.config.loaded else None
        svc = _find_service(app)
        if svc is not None:
            svc.lifecycle.begin_drain()
        log.info("drain_start %s", kv(signal=sig, grace_s=self.drain_grace_s))
        if self.drain_grace_s > 0:
            timer = threading.Timer(self.drain_grace_s, self._stop)
            timer.daemon = True
            timer.start()
        else:
            self._stop()

    def _stop(self) -> None:
        self.should_exit = True


def _find_service(app: Any) -> Any:
    # uvicorn wraps the app in middleware; walk `.app` links down to the FastAPI object.
    for _ in range(10):
        if app is None:
            return None
        state = getattr(app, "state", None)
        if state is not None and hasattr(state, "service"):
            return state.service
        app = getattr(app, "app", None)
    return None


def serve(app: Any, host: str = "127.0.0.1", port: int = 8000, drain_grace_s: float = 0.0, log_level: str = "info") -> None:
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,  # one log line per request costs more than the model at high rates
        timeout_graceful_shutdown=60,
        lifespan="on",
    )
    DrainingServer(config, drain_grace_s).run()
