"""Log lines shared by every command: `ts level logger event key=value ...`, or JSON.

The text format is for people; `json` (`--log-format json` or `CTR_LOG_FORMAT=json`) writes one
JSON object per line, `{"time", "level", "logger", "event", ...fields}`, for log pipelines that
index fields. Both come from the same call: `log.info("model_loaded %s", kv(version=3))`
renders `model_loaded version=3` as text and `{"event": "model_loaded", "version": 3}` as JSON,
because `kv` returns a string that still carries its fields.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import datetime, timezone
from typing import Any

FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
FORMATS = ("text", "json")
FORMAT_ENV = "CTR_LOG_FORMAT"
LEVEL_ENV = "CTR_LOG_LEVEL"


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is now, so a redirected or captured stderr is honoured."""

    @property  # type: ignore[override]
    def stream(self):  # noqa: D401
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


class KV(str):
    """The `key=value` text of some fields, with the fields themselves kept for JSON lines."""

    fields: dict[str, Any]

    def __new__(cls, text: str, fields: dict[str, Any]) -> "KV":
        obj = super().__new__(cls, text)
        obj.fields = fields
        return obj


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (UTC, ISO 8601), level, logger, event, then fields.

    The event is the message without its `kv(...)` arguments; their fields become keys (a field
    named like a fixed key is prefixed with `field_`). Exceptions go under `exc`.
    """

    FIXED = ("time", "level", "logger", "event")

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = {}
        args = record.args if isinstance(record.args, tuple) else ()
        if args and any(isinstance(a, KV) for a in args):
            for a in args:
                if isinstance(a, KV):
                    fields.update(a.fields)
            plain = tuple("" if isinstance(a, KV) else a for a in args)
            try:
                event = (str(record.msg) % plain).strip()
            except (TypeError, ValueError):
                event = record.getMessage()
        else:
            event = record.getMessage()
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "event": event,
        }
        for k, v in fields.items():
            out[f"field_{k}" if k in self.FIXED else k] = v
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def _formatter(fmt: str) -> logging.Formatter:
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    return JsonFormatter() if fmt == "json" else logging.Formatter(FORMAT)


def setup_logging(level: str | None = None, fmt: str | None = None) -> None:
    """Configure the root logger once; later calls change the level and format in place.

    Left out, the level and format come from CTR_LOG_LEVEL / CTR_LOG_FORMAT (INFO, text), so
    worker processes started with the parent's environment log the same way.
    """
    level = (level or os.environ.get(LEVEL_ENV) or "INFO").upper()
    fmt = fmt or os.environ.get(FORMAT_ENV)
    root = logging.getLogger()
    handler = getattr(root, "_ctr_handler", None)
    if handler is None:
        handler = _StderrHandler()
        handler.setFormatter(_formatter("text"))
        root.addHandler(handler)
        root._ctr_handler = handler  # type: ignore[attr-defined]
    if fmt:  # otherwise the format set before stays
        handler.setFormatter(_formatter(fmt.lower()))
    root.setLevel(level)


def uvicorn_log_config() -> dict[str, Any]:
    """uvicorn's `log_config` that hands its loggers to the root handler, so its own lines
    (start-up, shutdown, errors) come out in the process's format, JSON included, instead of
    uvicorn's fixed text format."""
    own = {"handlers": [], "propagate": True}
    return {"version": 1, "disable_existing_loggers": False,
            "loggers": {"uvicorn": dict(own), "uvicorn.error": dict(own), "uvicorn.access": dict(own)}}


def kv(**fields: object) -> KV:
    """Render key=value pairs, quoting values with spaces, for grep-able structured lines."""
    parts = []
    for k, v in fields.items():
        s = f"{v:.6g}" if isinstance(v, float) else str(v)
        parts.append(f"{k}={s!r}" if " " in s else f"{k}={s}")
    return KV(" ".join(parts), dict(fields))
