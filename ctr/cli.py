"""`ctr` subcommand dispatcher.

Each package owns its subcommands in a light `cli` module (stdlib imports only at module
level; torch, onnxruntime and FastAPI are imported inside the handlers). That keeps `ctr serve`
free of torch and `ctr --help` fast, and lets each package add commands without touching this
file beyond one line in REGISTRARS.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from model.logs import setup_logging

# (module, function) pairs; each function takes the subparsers object and adds its commands.
REGISTRARS: list[tuple[str, str]] = [
    ("model.cli", "register"),
    ("model.train_cli", "register"),
    ("export.cli", "register"),
    ("service.cli", "register"),
    ("testtime.cli", "register"),
    ("ctr.quickstart", "register"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ctr", description="ctr-serve: train, export and serve CTR models.")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING (default INFO)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module_name, func in REGISTRARS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and module_name.startswith(exc.name):
                continue  # that package's commands are not built yet
            raise
        getattr(module, func)(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # one clear line for user errors; a traceback only with DEBUG
        from model.readers import DataError
        from model.spec import SpecError

        user_errors: tuple[type[BaseException], ...] = (SpecError, DataError, FileNotFoundError, ValueError)
        if isinstance(exc, user_errors) and not logging.getLogger().isEnabledFor(logging.DEBUG):
            print(f"ctr {args.command}: error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    raise SystemExit(main())
