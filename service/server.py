"""Running the app under uvicorn with a graceful drain on SIGTERM.

Kubernetes sends SIGTERM and, at the same time, starts removing the pod from its endpoints;
for a moment traffic still arrives. So the first SIGTERM only flips readiness to false and
keeps serving for `drain_grace_s`; then uvicorn stops accepting, waits for every accepted
request (which waits on the batcher queue), runs the lifespan shutdown and exits 0. A second
signal exits at once.

Keep-alive connections are where a drain loses requests: a client that reuses an idle
keep-alive connection at the moment the server closes it sends a request that is never read,
and sees a dropped connection instead of an answer. So the drain ends them early, while the
listener still accepts (a client that sees its connection close reconnects and is served):
every response from SIGTERM on carries `Connection: close`, so each busy connection closes
right after its response in flight, and a connection idle for IDLE_CLOSE_S (a pooled one,
not one between two requests of a busy client, which would race) is closed by a sweep every
quarter second. When the listener finally closes, almost no keep-alive connection is left.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from dataclasses import dataclass
from typing import Any

import uvicorn

from model.logs import kv, uvicorn_log_config

log = logging.getLogger("service")

IDLE_CLOSE_S = 0.5  # a keep-alive connection idle this long during a drain is closed

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
        self._drain_begun = False

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self._signalled:
            self.force_exit = True
            return super().handle_exit(sig, frame)
        self._signalled = True
        # This runs inside a signal handler, between any two bytecodes of the main thread,
        # which may be holding a non-reentrant lock (threading's while it starts a thread,
        # prometheus_client's while it updates a value). Starting a timer thread and logging
        # from here left a worker with every thread waiting on a lock in one of seven SIGTERMs
        # under load. So only plain writes here; the rest runs as an event-loop callback.
        self.state.draining = True
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not serving yet: nothing to drain
            self.should_exit = True
            return
        loop.call_soon_threadsafe(self.begin_drain, f"signal {sig}")

    def begin_drain(self, why: str) -> None:
        """On the event loop: readiness false and `Connection: close` now, idle keep-alive
        connections closed, and the listener closed after the grace."""
        if self._drain_begun:
            return
        self._drain_begun = True
        self.state.draining = True
        app = self.config.loaded_app if self.config.loaded else None
        svc = _find_service(app)
        if svc is not None:
            svc.lifecycle.begin_drain()
        log.info("drain_start %s", kv(why=why, grace_s=self.drain_grace_s))
        self._close_idle_keepalive()
        if self.drain_grace_s > 0:
            asyncio.get_running_loop().call_later(self.drain_grace_s, self._stop)
        else:
            self._stop()

    def _close_idle_keepalive(self) -> None:
        """Close connections that answered at least IDLE_CLOSE_S ago and wait for a next
        request. A new connection with no request yet stays: its request is answered."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        closed = 0
        for conn in list(self.server_state.connections):
            cycle = getattr(conn, "cycle", None)
            timer = getattr(conn, "timeout_keep_alive_task", None)  # armed when a response completes
            if cycle is None or not cycle.response_complete or timer is None:
                continue
            idle_since = timer.when() - conn.timeout_keep_alive
            if now - idle_since >= IDLE_CLOSE_S:
                conn.shutdown()
                closed += 1
        if closed:
            log.info("drain_idle_closed %s", kv(connections=closed))
        if not self.should_exit:
            loop.call_later(0.25, self._close_idle_keepalive)

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
