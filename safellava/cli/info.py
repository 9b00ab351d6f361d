"""``safellava info``: resolved checkpoints, tower fit, sizes, versions and devices."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..config import ORIGINAL_TOWER
from ..errors import IncompatibleTowerError
from .common import EXIT_OK, print_line
from .options import add_model, resolved

HELP = "what a preset or model/tower resolves to, and whether the tower fits"
DESCRIPTION = (
    "Resolved checkpoints and revisions, family and prompt format, the tower's fit, parameter counts, "
    "expected weight memory, the tower fingerprint, versions and devices. Reads configs only (and the "
    "tower's weights if they are on disk) unless --load."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The info command's flags."""
    add_model(parser)
    parser.add_argument(
        "--load", action="store_true", help="also load the model and report its real footprint"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _human_bytes(count: int) -> str:
    return f"{count / 2**30:.2f} GiB" if count >= 2**30 else f"{count / 2**20:.1f} MiB"


def _images_line(model: dict[str, Any]) -> str:
    if model["pads_images"]:
        return "padded to a square, as LLaVA does"
    if model["original_pads_images"]:
        return "centre-cropped as llava-hf does (--no-pad); LLaVA itself pads them to a square"
    return "as LLaVA prepares them for this model (not padded)"


def info_text(report: dict[str, Any]) -> str:
    """The report as aligned lines for people."""
    model, tower, params = report["model"], report["vision_tower"], report["parameters"]
    lines = [
        f"preset          {report['preset'] or '-'}",
        f"model           {model['id']} (revision {model['revision'] or 'default'}, commit {model['commit'] or '-'})",
        f"family          {model['family']} ({model['language_model']} language model), vision_feature_layer {model['vision_feature_layer']}",
        f"prompt format   {model['prompt_format']}{'' if model['prompt_format'] == 'checkpoint' else ' (as LLaVA renders it)'}; checkpoint chat template {'present' if model['chat_template'] else 'absent'}",
        f"images          {_images_line(model)}",
    ]
    if tower["id"] == ORIGINAL_TOWER:
        lines.append("vision tower    original: the checkpoint's own CLIP (not Safe-CLIP)")
    else:
        lines.append(
            f"vision tower    {tower['id']} (revision {tower['revision'] or 'default'}, commit {tower['commit'] or '-'})"
        )
        shape = tower["shape"]
        lines.append(
            f"tower shape     hidden {shape['hidden_size']}, image {shape['image_size']}, patch {shape['patch_size']}, {shape['num_hidden_layers']} layers"
        )
        lines.append(
            "tower fit       fits"
            if tower["fits"]
            else f"tower fit       DOES NOT FIT: {'; '.join(tower['problems'])}. Use {tower['fits_hint']}"
        )
        lines.append(f"fingerprint     {tower['fingerprint'] or tower.get('fingerprint_note')}")
    lines.append(
        f"parameters      tower {params['vision_tower']:,}, projector {params['projector']:,}, "
        f"language model {params['language_model']:,}, total {params['total']:,}"
    )
    memory = report["weight_memory_bytes"]
    lines.append(
        f"weight memory   {_human_bytes(memory['none'])} in half precision, {_human_bytes(memory['8bit'])} with 8bit, "
        f"{_human_bytes(memory['4bit'])} with 4bit (approximate)"
    )
    versions = ", ".join(
        f"{name} {version or 'not installed'}" for name, version in report["versions"].items()
    )
    lines.append(f"versions        {versions}")
    devices = ", ".join(
        f"cuda:{d['index']} {d['name']} ({d['memory_gib']} GiB)" if d["type"] == "cuda" else d["type"]
        for d in report["devices"]
    )
    lines.append(f"devices         {devices}")
    if "loaded" in report:
        loaded = report["loaded"]
        lines.append(
            f"loaded          in {loaded['seconds']}s on {loaded['device']}, {loaded['dtype']}, quantize {loaded['quantize']}: "
            f"{_human_bytes(loaded['memory_footprint_bytes'])}"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Report from configs (and weights with --load)."""
    from .. import logs
    from ..info import setup_report

    logs.configure(args.verbose)
    options, _, preset = resolved(args)
    report = setup_report(options, preset=preset, load=args.load)
    print_line(json.dumps(report, indent=2) if args.json else info_text(report))
    # A script checking fit needs the answer in the exit code too.
    return EXIT_OK if report["vision_tower"]["fits"] else IncompatibleTowerError.exit_code
