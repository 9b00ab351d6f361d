"""What every command shares: exit codes, the one-line messages, loading the model, opening images."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from ..errors import UsageError
from .options import model_overrides, resolved

PROG = "safellava"
EXIT_OK, EXIT_SOME_FAILED, EXIT_INTERRUPTED = 0, 1, 130  # bad usage and unloadable models: 2 (errors.py)


def say(message: str) -> None:
    """One line on stderr, prefixed with the program's name."""
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


def load_model(args: argparse.Namespace) -> Any:
    """Load the model the arguments describe (the library call behind every command)."""
    from .. import logs
    from ..loader import load

    # Flags and preset are checked before minutes of loading, and the preset may choose the tower.
    options, _, _ = resolved(args)
    logs.configure(args.verbose)
    if options.uses_original_tower:
        say("using the checkpoint's original CLIP vision tower, not Safe-CLIP (--vision-tower original)")
    return load(args.preset, **model_overrides(args))


def open_images(sources: Sequence[str]) -> tuple[list[tuple[str, Any]], int]:
    """Open every image; report each bad one in a line on stderr. Returns (opened, failures)."""
    from ..errors import ImageError
    from ..images import load_image

    if sources.count("-") > 1:
        raise UsageError("'-' (stdin) can be given only once")
    opened, failures = [], 0
    for source in sources:
        try:
            data: Any = sys.stdin.buffer.read() if source == "-" else source
            image = load_image(data)
        except ImageError as exc:
            say(f"skipped {source if source != '-' else '<stdin>'}: {exc.reason}")
            failures += 1
            continue
        opened.append((source, image))
    return opened, failures


def print_line(text: str) -> None:
    """One line on stdout, flushed at once (outputs appear as batches finish)."""
    print(text, flush=True)
