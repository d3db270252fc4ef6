"""`ctr serve --workers N`: N worker processes answering on one port, under a parent that
supervises them.

One event loop tops out at about one core (JSON parsing, the feature fetch and encoding all
run on it), so a CPU host uses its cores through processes, each with its own event loop,
batcher and onnxruntime session. The parent binds the listening socket once and hands it to
every worker (a pre-fork server, as gunicorn and uvicorn's own `--workers` do): the kernel
queues connections on the one socket and whichever worker is free accepts. The parent loads
no model; it only

- starts the workers as `python -m service.worker` (fresh interpreters: no onnxruntime
  threads or Redis connections are forked) in a process group of their own, so a terminal's
  Ctrl-C reaches the parent alone and the drain stays ordered;
- restarts a worker that dies, after a back-off that grows while restarts keep failing; a
  worker failing start-up before any worker was ever ready stops the server with that
  worker's exit status, since the orchestrator, not a restart loop, should report a broken
  configuration or repository;
- owns the run directory: the merged Prometheus files (PROMETHEUS_MULTIPROC_DIR, emptied on
  start, a dead worker's live gauges removed with `mark_process_dead`), the config every
  worker reads, and the desired model versions (service/version_sync.py);
- forwards SIGTERM/SIGINT as SIGTERM to every worker and closes its copy of the listener, so
  the listener closes once the last worker stops accepting. Each worker then drains on its
  own (service/server.py); a second signal is forwarded too and makes them exit at once.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from model.logs import kv

log = logging.getLogger("service")

MAX_DEFAULT_WORKERS = 8
CONFIG_FILE = "config.json"
PLAN_FILE = "worker.json"
METRICS_DIR = "metrics"
READY_DIR = "ready"


def usable_cores() -> int:
    """Cores this process may run on: its CPU affinity, bounded by a cgroup v2 CPU quota
    (a container limited to 2 CPUs on a 64-core host still sees 64 in its affinity)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def gpu_present() -> bool:
    gpus = Path("/proc/driver/nvidia/gpus")
    return Path("/dev/nvidia0").exists() or (gpus.is_dir() and any(gpus.iterdir()))


def default_workers(providers: list[str]) -> int:
    """One per usable core (at most 8) on a CPU host. On a GPU host, one: the batcher's big
    batches are where a GPU's throughput comes from, and several processes would split them
    and hold several CUDA contexts (docs/operations.md, Scale)."""
    if gpu_present() and providers and providers[0] in ("CUDAExecutionProvider", "TensorrtExecutionProvider"):
        return 1
    return min(usable_cores(), MAX_DEFAULT_WORKERS)


def default_intra_op_threads(workers: int) -> int:
    """onnxruntime intra-op threads per worker when the config leaves it to us (0).

    Two (one on a one-core host). With 2 workers on 2 cores, 2 threads per worker gave more
    rows/s than 1 in 6 of 8 interleaved wrk pairs (medians +31% to +41%) at about the same CPU
    per request (-1% to +9%; docs/service.md, Workers): a worker's batch runs on two cores while the other
    worker's event loop waits, so batches finish sooner. More than 2 per worker was not
    measured and would only add threads waiting for the same cores.
    """
    return min(2, usable_cores())


@dataclass
class Plan:
    """What every worker needs besides the service config; written to the run directory."""

    workers: int
    host: str = "127.0.0.1"
    port: int = 8000
    drain_grace_s: float = 5.0
    restart_backoff_max_s: float = 30.0
    reload_sync_s: float = 0.25


@dataclass
class _Slot:
    index: int
    proc: subprocess.Popen | None = None
    started: float = 0.0
    failures: int = 0  # consecutive deaths soon after start
    restart_at: float | None = None


@dataclass
class Supervisor:
    cfg: Any  # ServiceConfig; the parent never imports the service's heavy modules
    plan: Plan
    run_dir: Path | None = None
    slots: list[_Slot] = field(default_factory=list)
    _stopping: int = 0
    _own_run_dir: bool = False
    _sock: socket.socket | None = None
    _ever_ready: bool = False
    _failed_start: int = 0  # exit status of a worker that failed before any was ready
    _wake: threading.Event = field(default_factory=threading.Event)
    exit_codes: list[int] = field(default_factory=list)  # of workers stopped by the drain

    # -- set-up ---------------------------------------------------------------------------

    def prepare_run_dir(self) -> Path:
        if self.run_dir is None:
            self.run_dir = Path(tempfile.mkdtemp(prefix="ctr-serve-"))
            self._own_run_dir = True
        d = self.run_dir
        d.mkdir(parents=True, exist_ok=True)
        for sub in (METRICS_DIR, READY_DIR):  # emptied on start: stale files would be merged
            shutil.rmtree(d / sub, ignore_errors=True)
            (d / sub).mkdir()
        (d / "desired_versions.json").unlink(missing_ok=True)
        (d / CONFIG_FILE).write_text(self.cfg.model_dump_json(), encoding="utf-8")
        (d / PLAN_FILE).write_text(json.dumps(asdict(self.plan)), encoding="utf-8")
        return d

    def bind(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.plan.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.plan.host, self.plan.port))
        sock.listen(2048)
        sock.set_inheritable(True)
        return sock

    # -- workers --------------------------------------------------------------------------

    def _spawn(self, slot: _Slot) -> None:
        assert self.run_dir is not None and self._sock is not None
        fd = self._sock.fileno()
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(self.run_dir / METRICS_DIR)}
        cmd = [sys.executable, "-m", "service.worker", "--run-dir", str(self.run_dir), "--fd", str(fd), "--index", str(slot.index)]
        slot.proc = subprocess.Popen(cmd, pass_fds=(fd,), env=env, process_group=0)
        slot.started = time.monotonic()
        slot.restart_at = None
        log.info("worker_started %s", kv(index=slot.index, pid=slot.proc.pid))

    def _reap(self, slot: _Slot) -> None:
        from prometheus_client.multiprocess import mark_process_dead

        assert slot.proc is not None and self.run_dir is not None
        pid, rc = slot.proc.pid, slot.proc.returncode
        mark_process_dead(pid, str(self.run_dir / METRICS_DIR))
        (self.run_dir / READY_DIR / str(pid)).unlink(missing_ok=True)
        slot.proc = None
        if self._stopping:
            self.exit_codes.append(rc)
            log.info("worker_exited %s", kv(index=slot.index, pid=pid, code=rc))
            return
        lived = time.monotonic() - slot.started
        slot.failures = slot.failures + 1 if lived < 10.0 else 0
        delay = min(self.plan.restart_backoff_max_s, 0.5 * 2 ** max(0, slot.failures - 1)) if slot.failures else 0.0
        slot.restart_at = time.monotonic() + delay
        log.warning("worker_died %s", kv(index=slot.index, pid=pid, code=rc, lived_s=round(lived, 1), restart_in_s=delay))

    def _any_ready(self) -> bool:
        if not self._ever_ready and self.run_dir is not None:
            self._ever_ready = any((self.run_dir / READY_DIR).iterdir())
        return self._ever_ready

    def pids(self) -> list[int]:
        return [s.proc.pid for s in self.slots if s.proc is not None]

    # -- signals --------------------------------------------------------------------------

    def _on_signal(self, sig: int, frame: Any) -> None:
        self._stopping += 1
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        self._wake.set()

    # -- main loop ------------------------------------------------------------------------

    def run(self) -> int:
        run_dir = self.prepare_run_dir()
        self._sock = self.bind()
        host, port = self._sock.getsockname()[:2]
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        log.info("serving %s", kv(host=host, port=port, workers=self.plan.workers, run_dir=run_dir, parent_pid=os.getpid()))
        code = 0
        try:
            self.slots = [_Slot(i) for i in range(self.plan.workers)]
            for slot in self.slots:
                self._spawn(slot)
            code = self._loop()
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
            for slot in self.slots:  # only reached with live workers after an error here
                if slot.proc is not None and slot.proc.poll() is None:
                    slot.proc.kill()
                    slot.proc.wait()
            if self._sock is not None:
                self._sock.close()
            if self._own_run_dir:
                shutil.rmtree(run_dir, ignore_errors=True)
        log.info("stopped %s", kv(code=code, worker_exit_codes=self.exit_codes))
        return code

    def _loop(self) -> int:
        closed = False
        while True:
            self._wake.wait(0.1)
            self._wake.clear()
            if self._stopping and not closed and self._sock is not None:
                # The workers hold the listener now; it closes when the last one stops accepting.
                self._sock.close()
                self._sock = None
                closed = True
                log.info("drain_forwarded %s", kv(workers=len(self.pids())))
            for slot in self.slots:
                if slot.proc is not None and slot.proc.poll() is not None:
                    rc = slot.proc.returncode
                    never_ready = not self._any_ready()
                    self._reap(slot)
                    if never_ready and not self._stopping:
                        log.error("worker_startup_failed %s", kv(index=slot.index, code=rc))
                        self._failed_start = rc if rc and rc > 0 else 1
                        self._on_signal(signal.SIGTERM, None)
                elif slot.proc is None and slot.restart_at is not None and not self._stopping and time.monotonic() >= slot.restart_at:
                    self._spawn(slot)
            if self._stopping and not self.pids():
                if self._failed_start:
                    return self._failed_start
                return 0 if all(c == 0 for c in self.exit_codes) else 1
