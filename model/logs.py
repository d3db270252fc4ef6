"""Structured log lines (`ts level logger event key=value ...`) shared by every command."""

from __future__ import annotations

import logging
import sys

FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is now, so a redirected or captured stderr is honoured."""

    @property  # type: ignore[override]
    def stream(self):  # noqa: D401
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def setup_logging(level: str = "INFO") -> None:
    root = logging.getLogger()
    if getattr(root, "_ctr_configured", False):
        root.setLevel(level.upper())
        return
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter(FORMAT))
    root.addHandler(handler)
    root.setLevel(level.upper())
    root._ctr_configured = True  # type: ignore[attr-defined]


def kv(**fields: object) -> str:
    """Render key=value pairs, quoting values with spaces, for grep-able structured lines."""
    parts = []
    for k, v in fields.items():
        s = f"{v:.6g}" if isinstance(v, float) else str(v)
        parts.append(f"{k}={s!r}" if " " in s else f"{k}={s}")
    return " ".join(parts)
