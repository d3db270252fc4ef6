"""`ctr` subcommand dispatcher.

Each package owns its subcommands in a light `cli` module (stdlib imports only at module
level; torch, onnxruntime and FastAPI are imported inside the handlers). That keeps `ctr serve`
free of torch and `ctr --help` fast, and lets each package add commands without touching this
file beyond one line in REGISTRARS.

The base install (`pip install ctr-serve`) serves and verifies models without torch; the
commands that train, export or generate data need the `train` extra, and say so in one line
when it is missing instead of a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Iterator, Sequence

from model.logs import FORMAT_ENV, FORMATS, LEVEL_ENV, setup_logging

# (module, function) pairs; each function takes the subparsers object and adds its commands.
REGISTRARS: list[tuple[str, str]] = [
    ("model.cli", "register"),
    ("model.train_cli", "register"),
    ("export.cli", "register"),
    ("service.cli", "register"),
    ("testtime.cli", "register"),
    ("ctr.quickstart", "register"),
]


# Imports that only the `train` extra provides (import name -> distribution name).
TRAIN_ONLY = {"torch": "torch", "onnxscript": "onnxscript", "sklearn": "scikit-learn", "safetensors": "safetensors", "tqdm": "tqdm"}
TRAIN_EXTRA_HINT = "pip install 'ctr-serve[train]'"


def _add_log_options(parser: argparse.ArgumentParser, default: object) -> None:
    parser.add_argument("--log-level", default=default, type=str.upper, choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help=f"default INFO, or ${LEVEL_ENV}")
    parser.add_argument("--log-format", default=default, choices=FORMATS,
                        help=f"text (default, or ${FORMAT_ENV}) or json: one JSON object per line")


def _subparsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                yield child
                yield from _subparsers(child)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ctr", description="ctr-serve: train, export and serve CTR models.")
    _add_log_options(parser, None)
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
    # The log options work after any command too (`ctr serve --log-format json`).
    for child in _subparsers(parser):
        _add_log_options(child, argparse.SUPPRESS)
    return parser


def require_training() -> None:
    """Fail at once, naming the extra, in a command that needs the training dependencies
    only in a later step (the quickstart runs its steps as child processes)."""
    import importlib.util

    for module in TRAIN_ONLY:
        if importlib.util.find_spec(module) is None:
            raise ModuleNotFoundError(f"No module named '{module}'", name=module)


def _missing_train_module(exc: BaseException) -> str | None:
    name = getattr(exc, "name", None) or ""
    top = name.split(".")[0]
    return TRAIN_ONLY.get(top) if isinstance(exc, ImportError) else None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Flags go into the environment, so the service's settings (flag > env > file) and any
    # worker process see the same choice.
    if args.log_level:
        os.environ[LEVEL_ENV] = args.log_level
    if args.log_format:
        os.environ[FORMAT_ENV] = args.log_format
    setup_logging(args.log_level, args.log_format)
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        return 130
    except SystemExit as exc:  # a refusal to start that is already one sentence
        if isinstance(exc.code, str):
            print(f"ctr {args.command}: error: {exc.code}", file=sys.stderr)
            return 1
        raise
    except Exception as exc:  # one clear line for user errors; a traceback only with DEBUG
        dist = _missing_train_module(exc)
        if dist is not None:
            print(f"ctr {args.command}: error: this command needs the training dependencies ({dist} is not installed): "
                  f"{TRAIN_EXTRA_HINT}", file=sys.stderr)
            return 2
        from model.readers import DataError
        from model.spec import SpecError

        user_errors: tuple[type[BaseException], ...] = (SpecError, DataError, FileNotFoundError, ValueError)
        if isinstance(exc, user_errors) and not logging.getLogger().isEnabledFor(logging.DEBUG):
            print(f"ctr {args.command}: error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    raise SystemExit(main())
