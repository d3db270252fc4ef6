"""One model version per variant across all the workers of a `ctr serve --workers N`.

`POST /admin/reload` reaches one worker, the one whose accept won the connection. That worker
loads the version and then writes what it now serves to a small JSON file in the server's run
directory (temporary file, then rename, so a reader never sees half of it). Every worker
checks the file a few times a second and loads what it names; a worker that starts later
(a restart after a crash) loads it before it accepts connections, so a replacement never
comes back on the version the others left.

Only swaps a worker makes on its own account are published: an admin reload or its own
repository poll. A swap made to follow the file is not, else a worker still catching up
with an older file could overwrite a newer one and pull the others back. A file read costs a
`stat` when nothing changed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from model.logs import kv

log = logging.getLogger("service")

DESIRED_FILE = "desired_versions.json"
# Set while a worker loads a version named by the file, so its swap is not published back.
_following: ContextVar[bool] = ContextVar("ctr_following_desired_versions", default=False)


class VersionSync:
    def __init__(self, path: str | Path, registry: Any, interval_s: float = 0.25) -> None:
        self.path = Path(path)
        self.registry = registry
        self.interval_s = interval_s
        self._seen: str | None = None  # generation of the newest file applied or written here
        self._stat: tuple[int, int] | None = None

    def install(self) -> None:
        """Publish after every swap the registry makes on this worker's own account."""
        before = self.registry.on_swap

        def on_swap() -> None:
            if before is not None:
                before()
            if not _following.get():
                self.publish()

        self.registry.on_swap = on_swap

    def state(self) -> dict[str, dict[str, Any]]:
        return {v: {"model": m.name, "version": int(m.version)} for v, m in self.registry.models.items()}

    def publish(self) -> None:
        generation = f"{time.time_ns()}-{os.getpid()}"
        doc = {"generation": generation, "pid": os.getpid(), "models": self.state()}
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(doc), encoding="utf-8")
        os.replace(tmp, self.path)
        self._seen = generation
        log.info("versions_published %s", kv(generation=generation, models=json.dumps(doc["models"], separators=(",", ":"))))

    def read(self) -> dict[str, Any] | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        key = (st.st_mtime_ns, st.st_size)
        if key == self._stat:
            return None
        try:
            doc = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None  # replaced between stat and read: the next check sees the new one
        self._stat = key
        return doc

    async def apply(self) -> list[dict[str, Any]]:
        """Load the versions the file names, where this worker serves others."""
        doc = self.read()
        if doc is None or doc.get("generation") == self._seen:
            return []
        self._seen = doc.get("generation")
        configs = {vc.name: vc for vc in self.registry.variant_configs()}
        results = []
        token = _following.set(True)
        try:
            for variant, want in doc.get("models", {}).items():
                vc = configs.get(variant)
                current = self.registry.models.get(variant)
                if vc is None or vc.model != want.get("model"):
                    log.warning("versions_ignored %s", kv(variant=variant, wanted=want, reason="not configured here"))
                    continue
                if current is not None and current.name == want["model"] and int(current.version) == int(want["version"]):
                    continue
                result = await self.registry.load(vc, int(want["version"]))
                results.append(result)
                log.info("versions_followed %s", kv(variant=variant, version=want["version"], result=result.get("result")))
        finally:
            _following.reset(token)
        return results

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.apply()
            except Exception as exc:  # following must never die; the next change is tried again
                log.error("versions_follow_error %s", kv(error=str(exc)[:300]))
