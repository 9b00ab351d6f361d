"""``safellava caption``: print one caption (or JSON record) per image as batches finish."""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import UsageError
from .common import EXIT_OK, EXIT_SOME_FAILED, load_model, open_images, print_line, printable, say
from .options import (
    add_backend,
    add_generation,
    add_model,
    add_show_prompt,
    generation_overrides,
    prompt_line,
)

HELP = "caption or ask about images"
DESCRIPTION = "Caption images (or answer --prompt about them) and print the results."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The caption command's flags."""
    add_model(parser)
    add_generation(parser)
    add_show_prompt(parser)
    add_backend(parser)
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files; '-' reads one from stdin")
    parser.add_argument("--json", action="store_true", help="one JSON object per line per image")
    parser.add_argument(
        "--stream", action="store_true", help="print the caption as it is generated (one image)"
    )


def run(args: argparse.Namespace) -> int:
    """Caption the images, printing each result as its batch finishes."""
    if args.stream and (len(args.images) > 1 or args.json):
        raise UsageError("--stream takes one image and prints plain text (no --json)")
    if args.stream and args.backend == "vllm":
        raise UsageError("--stream is for the transformers backend")
    opened, failures = open_images(args.images)
    if not opened:
        say("no image could be read")
        return EXIT_SOME_FAILED
    model = load_model(args)
    options = model.generation_options(**generation_overrides(args))
    if args.show_prompt:
        print(prompt_line(model.engine.caption_prompt(options)), file=sys.stderr, flush=True)
    if args.stream:
        for chunk in model.stream(opened[0][1], **generation_overrides(args)):
            sys.stdout.write(chunk)
            sys.stdout.flush()
        print_line("")
        return EXIT_OK
    several = len(args.images) > 1
    for start in range(0, len(opened), options.batch_size):
        chunk = opened[start : start + options.batch_size]
        captions = model.caption_images([image for _, image in chunk], options)
        for (name, _), caption in zip(chunk, captions, strict=True):
            if args.json:
                print_line(json.dumps(model.record(name, caption, options).to_dict(), ensure_ascii=False))
            else:
                print_line(f"{printable(name)}: {caption}" if several else caption)
    return EXIT_SOME_FAILED if failures else EXIT_OK
