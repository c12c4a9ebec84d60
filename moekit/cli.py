"""The `moekit` command line: one entry point, one module per subcommand.

Each module in moekit.commands defines `add_parser(subparsers)` and `run(args) -> int`;
modules are imported only when listed here, and heavy imports live inside `run`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings

from moekit.errors import MissingDependency

COMMANDS = ("demo", "convert", "analyze", "train", "sample", "compare")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moekit", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    modules = {}
    for name in COMMANDS:
        module = importlib.import_module(f"moekit.commands.{name}")
        module.add_parser(sub)
        modules[name] = module
    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warning(args.command)
            return int(modules[args.command].run(args) or 0)
    except BrokenPipeError:
        # The reader went away (`moekit sample ... | head -1`): not an error of ours. Later
        # writes to the closed stdout would raise again at exit, so it points nowhere.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (ValueError, TypeError, OSError, MissingDependency) as err:
        # User errors (files that cannot be read or written, an optional package not
        # installed) are reported in one line, not as a traceback.
        print(f"moekit {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Ctrl-C is a choice, not a crash: no traceback, and how to go on where it helps.
        hint = _RESUME_HINTS.get(args.command, "")
        print(f"moekit {args.command}: interrupted{hint}", file=sys.stderr)
        return 130


_RESUME_HINTS = {
    "train": "; the same command plus --resume continues from the last checkpoint, if any",
    "compare": "; the same command plus --resume continues the comparison from its "
    "checkpoints, if any",
}


def _one_line_warning(command: str):
    """Warnings as `moekit CMD: warning: ...`, like errors, without a source line."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        print(f"moekit {command}: warning: {message}", file=file or sys.stderr)

    return show


if __name__ == "__main__":
    sys.exit(main())
