"""One worker process of `ctr serve --workers N` (started by service/workers.py, not by hand).

It builds its own app (event loop, batcher, onnxruntime session, feature store client) from
the config the parent wrote to the run directory, and serves the parent's listening socket,
inherited as a file descriptor. Around the app's own start-up it adds what only a worker
needs: load the versions the other workers serve (service/version_sync.py) before accepting,
tell the parent it is ready, follow later reloads, and drain if the parent disappears.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import socket
import sys
from collections.abc import Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from model.logs import kv, setup_logging

log = logging.getLogger("service")


def _wrap_lifespan(app: Any, sync: Any, server: Any, ready_file: Path) -> None:
    inner = app.router.lifespan_context
    parent = os.getppid()

    async def watch_parent() -> None:
        # A parent killed with SIGKILL cannot forward SIGTERM; its workers drain by themselves.
        while os.getppid() == parent:
            await asyncio.sleep(1.0)
        server.begin_drain("parent exited")

    @asynccontextmanager
    async def lifespan(a: Any):
        async with inner(a) as state:
            await sync.apply()  # a restarted worker joins on the others' versions
            sync.install()
            tasks = [asyncio.create_task(sync.run()), asyncio.create_task(watch_parent())]
            ready_file.touch()
            try:
                yield state
            finally:
                for t in tasks:
                    t.cancel()

    app.router.lifespan_context = lifespan


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m service.worker")
    p.add_argument("--run-dir", required=True, type=Path)
    p.add_argument("--fd", required=True, type=int, help="the inherited listening socket")
    p.add_argument("--index", required=True, type=int)
    args = p.parse_args(argv)
    plan = json.loads((args.run_dir / "worker.json").read_text(encoding="utf-8"))

    from service.app import create_app
    from service.config import ServiceConfig
    from service.server import build_server
    from service.version_sync import DESIRED_FILE, VersionSync

    # The parent's settings as resolved (flags, environment, file): validated, not re-read.
    cfg = ServiceConfig.model_validate_json((args.run_dir / "config.json").read_text(encoding="utf-8"))
    setup_logging(cfg.log_level, cfg.log_format)
    app = create_app(cfg)
    server = build_server(app, plan["host"], plan["port"], plan["drain_grace_s"], cfg.log_level.lower())
    sync = VersionSync(args.run_dir / DESIRED_FILE, app.state.service.registry, plan["reload_sync_s"])
    _wrap_lifespan(app, sync, server, args.run_dir / "ready" / str(os.getpid()))
    sock = socket.socket(fileno=args.fd)
    log.info("worker %s", kv(index=args.index, pid=os.getpid(), intra_op_threads=cfg.scorer.intra_op_threads))
    server.run(sockets=[sock])
    # Every request is answered and the lifespan shutdown has run: skip the interpreter's
    # teardown of a large frozen heap and native sessions, which took ~2 s per worker.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1 if server.force_exit else 0)


if __name__ == "__main__":
    raise SystemExit(main())
