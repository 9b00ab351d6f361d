"""Command line: parse, call the library, print. No tensors here, and no torch import for --help.

Each command is a module with ``HELP``, ``DESCRIPTION``, ``add_arguments(parser)`` and ``run(args)``;
heavy imports happen inside ``run``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib import import_module

from .. import __version__
from ..errors import SafeLlavaError, first_line
from .common import EXIT_INTERRUPTED, EXIT_OK, EXIT_SOME_FAILED, PROG, say
from .options import add_common, resolved

COMMANDS = ("caption", "chat", "batch", "compare", "export", "info", "serve")


def build_parser() -> argparse.ArgumentParser:
    """The ``safellava`` argument parser with its subcommands."""
    parser = argparse.ArgumentParser(
        prog=PROG, description="Safe image-to-text with LLaVA and the Safe-CLIP vision tower."
    )
    add_common(parser, top_level=True)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        module = import_module(f".{name}", __name__)
        command = commands.add_parser(name, help=module.HELP, description=module.DESCRIPTION)
        add_common(command)
        module.add_arguments(command)
        command.set_defaults(handler=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``safellava`` command; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if hasattr(args, "preset"):  # a model command: check preset and flags before any work
            resolved(args)
        return args.handler(args)
    except SafeLlavaError as exc:
        if args.verbose:
            raise
        say(f"error: {first_line(exc)}")
        return exc.exit_code
    except KeyboardInterrupt:
        say("interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        sys.stderr.close()  # the reader went away (| head): nothing more to say
        return EXIT_OK
    except Exception as exc:
        if args.verbose:
            raise
        say(f"error: {type(exc).__name__}: {first_line(exc)} (rerun with --verbose for the traceback)")
        return EXIT_SOME_FAILED
