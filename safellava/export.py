"""Write a merged checkpoint: the LLaVA with the Safe-CLIP weights in its tower, loadable anywhere."""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from . import __version__
from .errors import UsageError
from .model import SafeLlava
from .vision import read_tower_config, tower_fingerprint
from .weights import resolve_weight_files, resolved_commit
from .writers import ordinary_mode

SAFE_CLIP_PAPER = "https://arxiv.org/abs/2311.16254"
SAFE_CLIP_LICENSE = "cc-by-nc-4.0"


def check_target(out_dir: Path, force: bool, sources: tuple[str, ...] = ()) -> None:
    """Refuse a file, a non-empty folder unless ``force``, and any folder holding a source or the cwd."""
    resolved = out_dir.resolve()
    for source in (*sources, "."):
        source_path = Path(source).expanduser()
        if source_path.exists() and (
            resolved == source_path.resolve() or resolved in source_path.resolve().parents
        ):
            what = "the current folder" if source == "." else source
            raise UsageError(f"cannot export to {out_dir}: it holds {what}, which --force would delete")
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"{out_dir} is a file, not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise UsageError(f"{out_dir} is not empty: choose another folder or pass --force to replace it")
    if not out_dir.parent.is_dir():
        raise UsageError(f"cannot export to {out_dir}: folder {out_dir.parent} does not exist")


def _base_license(repo: str, revision: str | None) -> str | None:
    """The ``license:`` of a checkpoint's model card front matter, where it has one."""
    from transformers.utils import cached_file

    try:
        card = cached_file(repo, "README.md", revision=revision, _raise_exceptions_for_missing_entries=False)
    except OSError:
        return None
    if card is None:
        return None
    front = Path(card).read_text(encoding="utf-8", errors="replace").split("---")
    match = re.search(r"^license:\s*(\S+)", front[1] if len(front) > 2 else "", re.MULTILINE)
    return match.group(1) if match else None


def provenance(loaded: SafeLlava, dtype: str) -> dict[str, Any]:
    """What ``safellava.json`` records: sources, revisions, tower fingerprint, versions."""
    options = loaded.options
    tower = read_tower_config(options.vision_tower, options.tower_revision)
    files = resolve_weight_files(options.vision_tower, options.tower_revision)
    return {
        "safellava_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": options.model,
        "revision": options.revision,
        "model_commit": resolved_commit(options.model, options.revision),
        "vision_tower": options.vision_tower,
        "tower_revision": options.tower_revision,
        "tower_commit": resolved_commit(options.vision_tower, options.tower_revision),
        "tower_fingerprint": tower_fingerprint(tower, files),
        "family": loaded.family,
        "prompt_format": loaded.prompt_format,
        "dtype": dtype,
    }


def model_card(info: dict[str, Any], base_license: str | None) -> str:
    """README.md for the exported folder: what it is, where it comes from, under which licences."""
    base = info["model"]
    tower = info["vision_tower"]
    license_line = f"`{base_license}`" if base_license else "see the base model's card"
    return f"""---
license: other
license_name: {SAFE_CLIP_LICENSE}-and-base-model-license
base_model:
- {base}
- {tower}
tags:
- llava
- safe-clip
- image-to-text
---

# {Path(base).name} with the Safe-CLIP vision tower

This is `{base}` with the weights of its CLIP vision tower replaced by those of the Safe-CLIP
encoder `{tower}` (Poppi et al., *Safe-CLIP: Removing NSFW Concepts from Vision-and-Language
Models*, ECCV 2024, {SAFE_CLIP_PAPER}), a CLIP fine-tuned so that NSFW visual concepts land in
safe regions of the embedding space. Nothing else changed: the projector and the language model are
the base model's. It was written by safellava {info["safellava_version"]} and loads with plain
transformers (`{"LlavaNextForConditionalGeneration" if info["family"] == "llava_next" else "LlavaForConditionalGeneration"}`, `AutoProcessor`) or any engine that
reads transformers checkpoints.

| | |
|---|---|
| base LLaVA | `{base}` (revision `{info["revision"] or "default"}`, commit `{info["model_commit"] or "local folder"}`) |
| vision tower | `{tower}` (revision `{info["tower_revision"] or "default"}`, commit `{info["tower_commit"] or "local folder"}`) |
| tower fingerprint | `{info["tower_fingerprint"]}` (sha256 of the tower's weights as its checkpoint stores them) |
| dtype | `{info["dtype"]}` |

## Licences

The Safe-CLIP weights are licensed **CC BY-NC 4.0** (non-commercial): this merged model is too.
The rest of the weights keep the base model's licence: {license_line}. Use of the model must respect
both.
"""


def _ordinary_permissions(folder: Path) -> None:
    """Give the staged folder and files the modes a plain mkdir/open would have (mkdtemp's are 0700)."""
    folder.chmod(ordinary_mode(directory=True))
    for path in folder.rglob("*"):
        path.chmod(ordinary_mode(directory=path.is_dir()))


def export(loaded: SafeLlava, out_dir: str | Path, force: bool = False) -> Path:
    """Save the merged model, processor, model card and ``safellava.json`` into ``out_dir``.

    Everything is written into a temporary folder beside the target and renamed at the end, so an
    interrupted export leaves no target folder behind.
    """
    if loaded.options.quantize != "none":
        raise UsageError(
            f"cannot export a {loaded.options.quantize}-quantized model: export in float16 or bfloat16 "
            "and quantize when loading the export (--quantize works on it too)"
        )
    if loaded.options.uses_original_tower:
        raise UsageError("export writes the Safe-CLIP model: --vision-tower original has nothing to merge")
    target = Path(out_dir).absolute()
    check_target(target, force, (loaded.options.model, loaded.options.vision_tower))
    dtype = str(loaded.model.dtype).removeprefix("torch.")
    info = provenance(loaded, dtype)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        loaded.model.save_pretrained(staging)
        loaded.processor.save_pretrained(staging)
        (staging / "safellava.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        card = model_card(info, _base_license(loaded.options.model, loaded.options.revision))
        (staging / "README.md").write_text(card, encoding="utf-8")
        _ordinary_permissions(staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target
