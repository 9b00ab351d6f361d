"""What every command shares: exit codes, the one-line messages, loading the model, opening images."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from ..errors import UsageError
from .options import generation_overrides, model_overrides, resolved

PROG = "safellava"
EXIT_OK, EXIT_SOME_FAILED, EXIT_INTERRUPTED = 0, 1, 130  # bad usage and unloadable models: 2 (errors.py)


def printable(text: str) -> str:
    """``text`` on one line: newlines and other control characters written as escapes."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def say(message: str) -> None:
    """One line on stderr, prefixed with the program's name."""
    print(f"{PROG}: {printable(message)}", file=sys.stderr, flush=True)


def announce_tower(options: Any) -> dict[str, Any] | None:
    """Say on stderr when the checkpoint's own tower will run; an export's record of its tower, if any."""
    from ..export import baked_tower

    baked = baked_tower(options) if options.uses_original_tower else None
    if options.uses_original_tower and baked is None:
        say("using the checkpoint's original CLIP vision tower, not Safe-CLIP (--vision-tower original)")
    return baked


def load_model(args: argparse.Namespace) -> Any:
    """Load the model the arguments describe (the library call behind every command)."""
    from .. import logs
    from ..loader import load

    # Flags and preset are checked before minutes of loading, and the preset may choose the tower.
    options, _, _ = resolved(args)
    logs.configure(args.verbose)
    baked = announce_tower(options)
    if getattr(args, "backend", "transformers") == "vllm":
        from ..vllm_backend import load_vllm

        return load_vllm(args.preset, **model_overrides(args), **generation_overrides(args))
    loaded = load(args.preset, **model_overrides(args))
    if baked is not None:
        say(describe_baked_tower(options.model, baked, loaded.tower_fingerprint))
    return loaded


def describe_baked_tower(model: str, baked: dict[str, Any], fingerprint: str) -> str:
    """What the tower of an exported model really is, checked against the fingerprint it was exported with."""
    if baked.get("merged_tower_fingerprint") == fingerprint:
        return (
            f"{model} is a safellava export: its tower is {baked['vision_tower']} (Safe-CLIP), baked in; "
            f"fingerprint {fingerprint} verified"
        )
    return (
        f"{model} has a safellava.json naming the tower {baked['vision_tower']}, but its tower weights are not "
        "the ones exported (fingerprint mismatch): running the checkpoint's own tower, which may not be Safe-CLIP"
    )


def open_images(sources: Sequence[str]) -> tuple[list[tuple[str, Any]], int]:
    """Open every image; report each bad one in a line on stderr. Returns (opened, failures)."""
    from ..errors import ImageError
    from ..images import load_image, read_limited

    if sources.count("-") > 1:
        raise UsageError("'-' (stdin) can be given only once")
    opened, failures = [], 0
    for source in sources:
        try:
            data: Any = read_limited(sys.stdin.buffer, "<stdin>") if source == "-" else source
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
