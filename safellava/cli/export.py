"""``safellava export``: the merged checkpoint, written atomically."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import EXIT_OK, load_model, say
from .options import add_model, resolved

HELP = "write the LLaVA with the Safe-CLIP tower baked in, for plain transformers and serving engines"
DESCRIPTION = (
    "Write a merged checkpoint (safetensors, the llava-hf layout) with a model card and safellava.json. "
    "Half precision unless --dtype says otherwise."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The export command's flags."""
    add_model(parser)
    parser.add_argument("out_dir", metavar="OUT_DIR", help="folder to create (must be empty, or --force)")
    parser.add_argument("--force", action="store_true", help="replace a non-empty OUT_DIR")


def run(args: argparse.Namespace) -> int:
    """Check the target and the setup, load once in the export's dtype, write."""
    from ..export import DEFAULT_DTYPE, check_exportable, check_target, export

    options, _, _ = resolved(args)
    check_exportable(options)
    check_target(Path(args.out_dir).absolute(), args.force, (options.model, options.vision_tower))
    args.dtype = args.dtype or DEFAULT_DTYPE  # loaded as it will be written: no second copy in memory
    model = load_model(args)
    target = export(model, args.out_dir, force=args.force, dtype=args.dtype)
    say(f"exported {model.model_id} with the tower {model.vision_tower} to {target}")
    return EXIT_OK
