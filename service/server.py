"""Running the app under uvicorn with a graceful drain on SIGTERM.

Kubernetes sends SIGTERM and, at the same time, starts removing the pod from its endpoints;
for a moment traffic still arrives. So the first SIGTERM only flips readiness to false and
keeps serving for `drain_grace_s`; then uvicorn stops accepting, waits for every accepted
request (which waits on the batcher queue), runs the lifespan shutdown and exits 0. A second
signal exits at once.

While draining, every response carries `Connection: close`, so uvicorn closes each keep-alive
connection right after the response in flight on it. Without that, a client that reuses an
idle keep-alive connection at the moment the listener shuts down sends a request that the
server closes unread, and the client sees a connection drop instead of an answer.
"""

from __future__ import annotations

import logging
import socket
import threading
from dataclasses import dataclass
from typing import Any

import uvicorn

from model.logs import kv, uvicorn_log_config

log = logging.getLogger("service")

# The documented default (docs/service.md, docs/operations.md): long enough for endpoints
# and kube-proxy to forget a pod after its readiness turns false.
DEFAULT_DRAIN_GRACE_S = 5.0


@dataclass
class DrainState:
    draining: bool = False


class CloseWhenDraining:
    """ASGI middleware: once draining, answer with `Connection: close` (uvicorn then closes
    the connection after this response instead of keeping it alive)."""

    def __init__(self, app: Any, state: DrainState) -> None:
        self.app = app  # `.app` lets _find_service walk through this wrapper
        self.state = state

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = self.state

        async def send_closing(message: dict[str, Any]) -> None:
            if state.draining and message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"connection"]
                headers.append((b"connection", b"close"))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_closing)


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, drain_grace_s: float = DEFAULT_DRAIN_GRACE_S, state: DrainState | None = None) -> None:
        super().__init__(config)
        self.drain_grace_s = drain_grace_s
        self.state = state if state is not None else DrainState()
        self._signalled = False

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self._signalled:
            self.force_exit = True
            return super().handle_exit(sig, frame)
        self._signalled = True
        self.begin_drain(f"signal {sig}")

    def begin_drain(self, why: str) -> None:
        """Readiness false and `Connection: close` now; stop accepting after the grace."""
        self.state.draining = True
        app = self.config.loaded_app if self.config.loaded else None
        svc = _find_service(app)
        if svc is not None:
            svc.lifecycle.begin_drain()
        log.info("drain_start %s", kv(why=why, grace_s=self.drain_grace_s))
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


def build_server(
    app: Any,
    host: str = "127.0.0.1",
    port: int = 8000,
    drain_grace_s: float = DEFAULT_DRAIN_GRACE_S,
    log_level: str = "info",
) -> DrainingServer:
    state = DrainState()
    config = uvicorn.Config(
        CloseWhenDraining(app, state),
        host=host,
        port=port,
        log_level=log_level,
        log_config=uvicorn_log_config(),  # uvicorn's lines in the process's format (JSON too)
        access_log=False,  # one log line per request costs more than the model at high rates
        timeout_graceful_shutdown=60,
        lifespan="on",
    )
    return DrainingServer(config, drain_grace_s, state)


def serve(
    app: Any,
    host: str = "127.0.0.1",
    port: int = 8000,
    drain_grace_s: float = DEFAULT_DRAIN_GRACE_S,
    log_level: str = "info",
    sockets: list[socket.socket] | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT and the drain finish; `sockets` are listeners bound
    elsewhere (a worker serving its parent's socket), otherwise uvicorn binds host:port."""
    build_server(app, host, port, drain_grace_s, log_level).run(sockets=sockets)
