"""`ctr quickstart`: synthetic data -> DGenCTR -> model package -> a running service, in one go.

Each step runs as its own `ctr` child process, exactly the command a user would type next,
so the quickstart exercises the real CLI and the service never imports torch. Settings are
small on purpose: the point is a working, explainable end-to-end system in about a minute on
a laptop, and the test AUC is printed next to the generator's Bayes AUC so the gap is visible.

Re-running rebuilds every step from scratch (the previous data/run/models folders of this
workdir are removed first) unless `--reuse` is given; then a step is skipped only when its
recorded settings equal the current ones, and the skip is logged. Only the standard library
is imported at module level.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("quickstart")

STATE_FILE = "quickstart.json"
MODEL_NAME = "quickstart"
STEPS = ("data", "train", "export", "serve")


@dataclass(frozen=True)
class QuickstartSettings:
    """What determines the artefacts; a saved copy decides whether `--reuse` may skip a step."""

    rows: int = 50_000
    users: int = 2_000
    items: int = 500
    seed: int = 7
    epochs: int = 2
    pretrain_epochs: int = 1
    batch_size: int = 512
    lr: float = 0.003
    d_model: int = 16
    layers: int = 1
    heads: int = 2

    def data_args(self) -> dict[str, Any]:
        return {"rows": self.rows, "users": self.users, "items": self.items, "seed": self.seed}

    def train_args(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k not in self.data_args()}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quickstart",
        help="synthesize data, train DGenCTR, export it and serve it on 127.0.0.1:8000",
        description="End to end in one command: `ctr data synth` -> `ctr train --model dgenctr` -> "
        "`ctr export` -> `ctr serve` (embedded feature store), then print a ready-to-paste curl.",
    )
    d = QuickstartSettings()
    p.add_argument("--workdir", default="./quickstart", help="where data/, run/ and models/ go (default ./quickstart)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--no-serve", action="store_true", help="build data, run and package only; do not start the service")
    p.add_argument("--rows", type=int, default=d.rows, help=f"synthetic interactions (default {d.rows})")
    p.add_argument("--users", type=int, default=d.users)
    p.add_argument("--items", type=int, default=d.items)
    p.add_argument("--epochs", type=int, default=d.epochs, help="fine-tuning epochs")
    p.add_argument("--pretrain-epochs", type=int, default=d.pretrain_epochs, help="diffusion pre-training epochs")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--reuse", action="store_true", help="skip steps whose outputs exist and were made with the same settings")
    p.add_argument("--ready-timeout-s", type=float, default=120.0, help="give up if /readyz is not 200 by then")
    p.set_defaults(handler=run)


def _settings(args: argparse.Namespace) -> QuickstartSettings:
    return QuickstartSettings(
        rows=args.rows, users=args.users, items=args.items, seed=args.seed, epochs=args.epochs, pretrain_epochs=args.pretrain_epochs
    )


def _kv(**fields: object) -> str:
    from model.logs import kv

    return kv(**fields)


class Workdir:
    """The quickstart's folder and its state file (settings each finished step was built with)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.data = root / "data"
        self.run = root / "run"
        self.models = root / "models"
        self.state_path = root / STATE_FILE

    def prepare(self) -> dict[str, Any]:
        """Refuse a non-empty folder the quickstart did not make: it deletes its subfolders."""
        if self.root.exists() and any(self.root.iterdir()) and not self.state_path.exists():
            raise ValueError(f"{self.root} exists, is not empty and was not made by `ctr quickstart`; pass another --workdir")
        self.root.mkdir(parents=True, exist_ok=True)
        if self.state_path.exists():
            return json.loads(self.state_path.read_text(encoding="utf-8"))
        state: dict[str, Any] = {"steps": {}}
        self.save(state)
        return state

    def save(self, state: dict[str, Any]) -> None:
        self.state_path.write_text(json.dumps(state, indent=1), encoding="utf-8")

    def clear(self, *folders: Path) -> None:
        for f in folders:
            if f.exists():
                shutil.rmtree(f)


def _ctr(*argv: str) -> list[str]:
    return [sys.executable, "-m", "ctr", *argv]


def _step(n: int, name: str, cmd: list[str], quiet_stdout: bool = False) -> float:
    """Run one `ctr` child; its own log lines and progress bars stream straight through."""
    shown = " ".join(["ctr", *cmd[3:]])
    log.info("step %s", _kv(step=f"{n}/{len(STEPS)}", name=name, cmd=shown))
    t0 = time.perf_counter()
    out = subprocess.run(cmd, stdout=subprocess.DEVNULL if quiet_stdout else None, check=False)
    seconds = time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError(f"step '{name}' failed (exit {out.returncode}): {shown}")
    log.info("step_done %s", _kv(step=f"{n}/{len(STEPS)}", name=name, seconds=round(seconds, 1)))
    return seconds


def build(wd: Workdir, s: QuickstartSettings, reuse: bool, progress: bool) -> dict[str, Any]:
    """Steps 1-3; returns the state (with the published package path)."""
    state = wd.prepare()
    done = state.setdefault("steps", {})
    same_data = reuse and done.get("data") == s.data_args() and (wd.data / "meta.json").exists()
    same_run = same_data and done.get("train") == s.train_args() and (wd.run / "metrics.json").exists()
    pkg = done.get("export", {}).get("package") if same_run else None
    same_pkg = bool(pkg) and (Path(pkg) / "metadata.json").exists()

    if same_data:
        log.info("reuse %s", _kv(step="data", path=wd.data, settings=json.dumps(s.data_args())))
    else:
        wd.clear(wd.data, wd.run, wd.models)
        done.clear()
        wd.save(state)
        _step(1, "data", _ctr("data", "synth", "--out", str(wd.data), "--rows", str(s.rows), "--users", str(s.users),
                              "--items", str(s.items), "--seed", str(s.seed)), quiet_stdout=True)
        done["data"] = s.data_args()
        wd.save(state)

    if same_run:
        log.info("reuse %s", _kv(step="train", path=wd.run, settings=json.dumps(s.train_args())))
    else:
        wd.clear(wd.run, wd.models)
        done.pop("train", None)
        done.pop("export", None)
        wd.save(state)
        cmd = _ctr("train", "--spec", "synthetic", "--data", str(wd.data), "--model", "dgenctr", "--out", str(wd.run),
                   "--epochs", str(s.epochs), "--pretrain-epochs", str(s.pretrain_epochs), "--batch-size", str(s.batch_size),
                   "--pretrain-batch-size", str(4 * s.batch_size), "--lr", str(s.lr), "--d-model", str(s.d_model),
                   "--layers", str(s.layers), "--heads", str(s.heads), "--seed", str(s.seed))
        if not progress:
            cmd.append("--no-progress")
        _step(2, "train", cmd, quiet_stdout=True)
        done["train"] = s.train_args()
        wd.save(state)

    if same_pkg:
        log.info("reuse %s", _kv(step="export", package=pkg))
    else:
        wd.clear(wd.models)
        _step(3, "export", _ctr("export", "--run", str(wd.run), "--repo", str(wd.models), "--name", MODEL_NAME), quiet_stdout=True)
        from export.package import list_versions, package_path

        version = max(int(v) for v in list_versions(wd.models, MODEL_NAME))
        done["export"] = {"package": str(package_path(wd.models, MODEL_NAME, version))}
        wd.save(state)
    return state


def summary(wd: Workdir) -> dict[str, Any]:
    """Test AUC of the run next to the generator's Bayes-optimal AUC on the same split."""
    metrics = json.loads((wd.run / "metrics.json").read_text(encoding="utf-8"))
    meta = json.loads((wd.data / "meta.json").read_text(encoding="utf-8"))
    bayes = meta.get("bayes_auc", {})
    return {"test_auc": metrics["test"]["auc"], "bayes_auc": bayes.get("test") if isinstance(bayes, dict) else bayes}


def example_request(wd: Workdir, n_items: int = 3) -> dict[str, Any]:
    """A request built from real rows: the most active user and a few of the most clicked items."""
    import pandas as pd

    users = pd.read_parquet(wd.data / "users.parquet")
    train = pd.read_parquet(wd.data / "train.parquet", columns=["item_id", "device", "hour"])
    user = str(users.sort_values("user_activity", ascending=False)["user_id"].iloc[0])
    items = [str(i) for i in train["item_id"].value_counts().index[:n_items]]
    return {"user_id": user, "context": {"device": str(train["device"].iloc[0]), "hour": int(train["hour"].iloc[0])},
            "items": [{"item_id": i} for i in items]}


def curl(host: str, port: int, body: dict[str, Any]) -> str:
    shown = "localhost" if host in ("0.0.0.0", "127.0.0.1") else host
    return f"curl -s http://{shown}:{port}/score -H 'content-type: application/json' -d '{json.dumps(body)}'"


def _get(url: str, timeout: float = 2.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return 0


def serve(wd: Workdir, args: argparse.Namespace, body: dict[str, Any], scores: dict[str, Any], t_start: float) -> int:
    """Start `ctr serve` as a child, wait for /readyz, print the curl, then wait; signals are passed on."""
    cmd = _ctr("serve", "--repo", str(wd.models), "--model", MODEL_NAME, "--users", str(wd.data / "users.parquet"),
               "--items", str(wd.data / "items.parquet"), "--host", args.host, "--port", str(args.port),
               # No load balancer sits in front of a local demo, so nothing needs the 5 s in which
               # a pod leaves its endpoints: Ctrl-C stops accepting at once and drains in-flight requests.
               "--drain-grace-s", "0")
    log.info("step %s", _kv(step=f"4/{len(STEPS)}", name="serve", cmd=" ".join(["ctr", *cmd[3:]])))
    child = subprocess.Popen(cmd)

    stopping: list[int] = []  # a signal we passed on: the child's exit is then expected

    def forward(sig: int, _frame: Any) -> None:
        stopping.append(sig)
        if child.poll() is None:
            child.send_signal(sig)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        probe_host = "127.0.0.1" if args.host in ("0.0.0.0", "") else args.host
        ready_url = f"http://{probe_host}:{args.port}/readyz"
        deadline = time.monotonic() + args.ready_timeout_s
        while _get(ready_url) != 200:
            if child.poll() is not None:
                if stopping:  # stopped before our own probe saw it ready (a caller may probe faster)
                    log.info("serve_stopped %s", _kv(code=child.returncode, signal=stopping[0]))
                    return child.returncode
                log.error("serve_exited %s", _kv(code=child.returncode))
                return child.returncode or 1
            if time.monotonic() > deadline:
                log.error("not_ready %s", _kv(url=ready_url, timeout_s=args.ready_timeout_s))
                child.send_signal(signal.SIGTERM)
                child.wait(30)
                return 1
            time.sleep(0.25)
        ready_s = time.perf_counter() - t_start
        log.info("ready %s", _kv(url=ready_url, seconds_since_start=round(ready_s, 1), **scores))
        print(
            f"\nctr quickstart is serving DGenCTR (ready after {ready_s:.0f} s): "
            f"test AUC {scores['test_auc']:.4f} vs Bayes AUC {scores['bayes_auc']:.4f}.\n"
            f"Try it:\n\n  {curl(args.host, args.port, body)}\n\n"
            f"Metrics: http://localhost:{args.port}/metrics   API docs: http://localhost:{args.port}/docs\n"
            "Ctrl-C stops the service (it drains in-flight requests first).\n",
            flush=True,
        )
        return child.wait()
    finally:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
            try:
                child.wait(30)
            except subprocess.TimeoutExpired:
                child.kill()
        for s, h in old.items():
            signal.signal(s, h)


def run(args: argparse.Namespace) -> int:
    from ctr.cli import require_training

    require_training()  # data, train and export need the `train` extra; say so before step 1
    t_start = time.perf_counter()
    wd = Workdir(Path(args.workdir).resolve())
    s = _settings(args)
    log.info("quickstart %s", _kv(workdir=wd.root, reuse=args.reuse, serve=not args.no_serve, **asdict(s)))
    build(wd, s, args.reuse, progress=sys.stderr.isatty())
    scores = summary(wd)
    body = example_request(wd)
    state = json.loads(wd.state_path.read_text(encoding="utf-8"))
    package = state["steps"]["export"]["package"]
    log.info("built %s", _kv(package=package, seconds=round(time.perf_counter() - t_start, 1), **scores))
    if args.no_serve:
        print(json.dumps({"package": package, **scores, "example_request": body}, indent=2), flush=True)
        return 0
    return serve(wd, args, body, scores, t_start)

