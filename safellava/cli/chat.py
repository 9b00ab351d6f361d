"""``safellava chat``: a conversation about an image, in a terminal or from piped stdin."""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Any

from .common import EXIT_OK, EXIT_SOME_FAILED, PROG, load_model, say
from .options import add_generation, add_model, add_show_prompt, generation_overrides, prompt_line

HELP = "talk about an image, turn by turn"
DESCRIPTION = (
    "Chat about an image: answers stream as they are generated; /help lists the commands. "
    "With stdin not a terminal, each line is a question and only the answers are printed."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The chat command's flags."""
    add_model(parser)
    add_generation(parser, batched=False)
    add_show_prompt(parser)
    parser.add_argument("image", nargs="?", metavar="IMAGE", help="the image to talk about (or /image later)")


def banner(model: Any) -> str:
    """The first line of an interactive chat: model, tower, precision."""
    name = model.preset if model.preset and model.model_id == model.options.model else model.model_id
    precision = model.options.quantize if model.options.quantize != "none" else str(model.placement.dtype)
    return f"{PROG} · {name} · tower {model.vision_tower} · {precision.replace('torch.', '')} · /help for commands"


def _terminal_reader(prompt: str) -> str | None:
    try:
        return input(prompt)
    except EOFError:
        print(file=sys.stderr)
        return None


def _pipe_reader(prompt: str) -> str | None:
    line = sys.stdin.readline()
    return line if line else None


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def run(args: argparse.Namespace) -> int:
    """Talk until the input ends or /quit.

    On a terminal a failed command is only reported (exit 0); with piped input it is a failed
    script (exit 1).
    """
    from ..chat import ChatSession
    from ..images import load_image
    from ..repl import ChatIO, ChatLoop

    image = load_image(args.image) if args.image else None
    model = load_model(args)
    session = ChatSession(model, model.generation_options(**generation_overrides(args)))
    if args.show_prompt:
        session.on_prompt = lambda prompt: print(prompt_line(prompt), file=sys.stderr, flush=True)
    if image is not None:
        session.set_image(image, name=args.image)
    interactive = sys.stdin.isatty()
    if interactive:
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401 - line editing and history for input()

    io = ChatIO(
        read_line=_terminal_reader if interactive else _pipe_reader,
        write=_write,
        error=say,
        notice=lambda message: print(message, file=sys.stderr, flush=True),
        interactive=interactive,
    )
    if interactive:
        io.notice(banner(model))
        if image is None:
            io.notice("no image yet: questions are text only until /image PATH")
    failures = ChatLoop(session, io).run()
    return EXIT_SOME_FAILED if failures and not interactive else EXIT_OK
