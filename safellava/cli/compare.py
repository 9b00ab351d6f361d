"""``safellava compare``: each image's caption through the safe tower and the original one."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import textwrap

from .common import EXIT_OK, EXIT_SOME_FAILED, load_model, open_images, print_line, printable, say
from .options import add_generation, add_model, generation_overrides, resolved

HELP = "caption images through the safe and the original tower, side by side"
DESCRIPTION = (
    "Caption each image twice with the same LLaVA, prompt and seed: through the Safe-CLIP tower and "
    "through the checkpoint's original CLIP tower. The language model is loaded once."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The compare command's flags."""
    add_model(parser)
    add_generation(parser)
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files; '-' reads one from stdin")
    parser.add_argument("--json", action="store_true", help="one JSON object per line per image")


def wrap_table(rows: list[tuple[str, str, str]], headers: tuple[str, str, str]) -> str:
    """A three-column text table wrapped to the terminal's width."""
    width = shutil.get_terminal_size((100, 24)).columns
    first = min(max(len(headers[0]), *(len(r[0]) for r in rows)), width // 4)
    rest = max(20, (width - first - 6) // 2)
    widths = (first, rest, rest)
    lines = []
    for row in [headers, *rows]:
        cells = [textwrap.wrap(cell, w) or [""] for cell, w in zip(row, widths, strict=True)]
        for index in range(max(len(c) for c in cells)):
            parts = [
                (c[index] if index < len(c) else "").ljust(w) for c, w in zip(cells, widths, strict=True)
            ]
            lines.append(" | ".join(parts).rstrip())
        if row is headers:
            lines.append("-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Caption through both towers and print them side by side (or as JSON records)."""
    from ..compare import TowerComparer, check_comparable

    check_comparable(resolved(args)[0])
    opened, failures = open_images(args.images)
    if not opened:
        say("no image could be read")
        return EXIT_SOME_FAILED
    model = load_model(args)
    options = model.generation_options(**generation_overrides(args))
    names = [name for name, _ in opened]
    results = TowerComparer(model).compare(names, [image for _, image in opened], options)
    if args.json:
        for result in results:
            print_line(json.dumps(result.to_dict(), ensure_ascii=False))
    elif sys.stdout.isatty():
        rows = [(printable(r.image), r.safe, r.original) for r in results]
        print_line(wrap_table(rows, ("image", f"safe ({model.vision_tower})", "original CLIP")))
    else:
        for r in results:
            print_line(f"{printable(r.image)}\n  safe:     {r.safe}\n  original: {r.original}")
    return EXIT_SOME_FAILED if failures else EXIT_OK
