"""The `prumerge` command.

Each subcommand lives in its own module under `prumerge.commands` and exposes
`register(subparsers)`, which adds its parser and sets `func` to a callable taking the parsed
arguments and returning an exit code. Command modules import heavy libraries (transformers,
matplotlib) inside their run functions, so `prumerge --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from prumerge import __version__
from prumerge.errors import PrumergeError

# Module names under prumerge.commands, in the order `prumerge --help` lists them.
COMMANDS: tuple[str, ...] = ("ask", "methods", "eval", "cost", "bench", "train", "demo")
# Commands that load a model, and so import transformers anyway: they run quiet_libraries.
_MODEL_COMMANDS = frozenset({"ask", "eval", "bench", "train", "demo"})


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line, like every other error (the usage is one --help away)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="prumerge",
        description="Adaptive visual-token pruning and merging for large multimodal models.",
    )
    parser.add_argument("--version", action="version", version=f"prumerge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"prumerge.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"prumerge.commands.{name}":
                continue  # not built yet
            raise
        module.register(sub)
    for command in sub.choices.values():
        command.add_argument(
            "--verbose",
            action="store_true",
            help="also show the libraries' progress bars, messages and FutureWarnings",
        )
    return parser


class _StderrHandler(logging.Handler):
    """Writes prumerge's log records to whatever ``sys.stderr`` is at the time."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            print(f"prumerge: {self.format(record)}", file=sys.stderr, flush=True)
        except Exception:  # noqa: BLE001 - logging must never break the command
            self.handleError(record)


def _show_library_messages() -> None:
    """Show prumerge's info and warning lines (building the model, rebuilding a damaged
    cache entry) on stderr, once per process."""
    logger = logging.getLogger("prumerge")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        logger.addHandler(_StderrHandler())
        logger.setLevel(logging.INFO)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error (one line, exit 2)
        return 0 if exc.code is None else int(exc.code)
    _show_library_messages()
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        if args.command in _MODEL_COMMANDS:
            from prumerge.quiet import quiet_libraries

            with quiet_libraries(verbose=args.verbose):
                return int(args.func(args) or 0)
        return int(args.func(args) or 0)
    except PrumergeError as exc:
        print(f"prumerge: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prumerge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
