"""The vision tower: read its config, check that it fits a LLaVA, map its weights, fingerprint it."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import SAFE_CLIP_224, SAFE_CLIP_336
from .errors import IncompatibleTowerError, ModelLoadError, load_failure

_VISION_HALF = "vision_model."
_TOP_LEVEL_MODULES = ("embeddings.", "pre_layrnorm.", "encoder.", "post_layernorm.")
# The shapes of the Safe-CLIP towers, to name the one that fits a LLaVA.
_SAFE_CLIP_TOWERS = {
    (1024, 336, 14): f"ViT-L/14-336, such as {SAFE_CLIP_336}",
    (1024, 224, 14): f"ViT-L/14 at 224 px, such as {SAFE_CLIP_224}",
}


@dataclass(frozen=True)
class TowerSpec:
    """A vision tower checkpoint, resolved: where it is and its vision config."""

    source: str  # hub id or folder
    config: Any  # transformers CLIPVisionConfig


def read_tower_config(source: str, revision: str | None = None) -> TowerSpec:
    """Read the vision config of a ``CLIPModel`` or ``CLIPVisionModel`` checkpoint (no weights)."""
    from transformers import AutoConfig

    from .weights import missing_folder

    if missing_folder(source):
        raise ModelLoadError(f"vision tower folder {source} does not exist")
    try:
        config = AutoConfig.from_pretrained(source, revision=revision)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load vision tower {source}: {load_failure(source, exc)}") from None
    if config.model_type == "clip":
        vision = config.vision_config
    elif config.model_type == "clip_vision_model":
        vision = config
    else:
        raise ModelLoadError(
            f"vision tower {source} is a {config.model_type!r} checkpoint, not CLIP: "
            f"use a CLIP ViT checkpoint such as {SAFE_CLIP_336}"
        )
    return TowerSpec(source=source, config=vision)


def _feature_layers(llava_config: Any) -> list[int]:
    layer = llava_config.vision_feature_layer
    return [layer] if isinstance(layer, int) else list(layer)


def fit_problems(llava_config: Any, tower_config: Any) -> list[str]:
    """What keeps a tower from replacing the LLaVA's own: empty when it fits."""
    expected = llava_config.vision_config
    problems = [
        f"{label} {getattr(tower_config, attr)} where the LLaVA needs {getattr(expected, attr)}"
        for attr, label in (
            ("hidden_size", "hidden size"),
            ("image_size", "image size"),
            ("patch_size", "patch size"),
        )
        if getattr(tower_config, attr) != getattr(expected, attr)
    ]
    depth = tower_config.num_hidden_layers
    for layer in _feature_layers(llava_config):
        # hidden_states holds the embeddings plus one entry per layer: depth + 1 in all.
        if not -(depth + 1) <= layer <= depth:
            problems.append(f"{depth} layers, too few for vision_feature_layer {layer}")
    return problems


def fitting_tower_hint(llava_config: Any) -> str:
    """Which tower would fit this LLaVA, in words."""
    vision = llava_config.vision_config
    shape = (vision.hidden_size, vision.image_size, vision.patch_size)
    hint = f"a CLIP ViT with hidden size {shape[0]}, image size {shape[1]} and patch size {shape[2]}"
    if shape in _SAFE_CLIP_TOWERS:
        hint += f" ({_SAFE_CLIP_TOWERS[shape]})"
    return hint


def check_tower_fits(llava_config: Any, tower: TowerSpec, model_name: str) -> None:
    """Raise ``IncompatibleTowerError`` naming every mismatch and the tower that would fit."""
    problems = fit_problems(llava_config, tower.config)
    if problems:
        raise IncompatibleTowerError(
            f"vision tower {tower.source} does not fit {model_name}: {'; '.join(problems)}. "
            f"Use {fitting_tower_hint(llava_config)}"
        )


def expected_tower_keys(tower_config: Any) -> set[str]:
    """State-dict keys of a CLIP vision model with this config (built on the meta device)."""
    import torch
    from transformers import CLIPVisionModel

    with torch.device("meta"):
        model = CLIPVisionModel(tower_config)
    return set(model.state_dict())


def tower_state_dict(checkpoint: Mapping[str, Any], tower: TowerSpec, prefix: str = "") -> dict[str, Any]:
    """The tower's vision weights under ``prefix`` + their ``CLIPVisionModel`` names; the text half is left unread."""
    expected = expected_tower_keys(tower.config)
    mapped: dict[str, Any] = {}
    for key, tensor in checkpoint.items():
        if key.startswith(_VISION_HALF):
            name = key[len(_VISION_HALF) :]
        elif key.startswith(_TOP_LEVEL_MODULES):
            name = key
        else:
            continue  # text half, projections, logit scale
        if name in expected:
            mapped[prefix + name] = tensor
    missing = sorted(expected - {k[len(prefix) :] for k in mapped})
    if missing:
        raise ModelLoadError(
            f"vision tower {tower.source} lacks {len(missing)} of its {len(expected)} vision weights "
            f"(first: {missing[0]}): the checkpoint is incomplete or not a CLIP vision model"
        )
    return mapped


def fingerprint(tensors: Mapping[str, Any]) -> str:
    """sha256 over named tensors as a checkpoint stores them: names, dtypes, shapes and bytes, by name.

    Given a tower's ``CLIPVisionModel`` names, it names the exact weights behind a caption or an
    export, whatever dtype they ran in.
    """
    import torch

    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name][...].contiguous()
        digest.update(f"{name}|{str(tensor.dtype).removeprefix('torch.')}|{list(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return f"sha256:{digest.hexdigest()}"


def tower_fingerprint(tower: TowerSpec, files: list[Path]) -> str:
    """The fingerprint of a CLIP checkpoint's vision weights (remembered per weight file)."""
    from .cache import cached_fingerprint
    from .weights import open_lazy_state_dict

    def compute() -> str:
        with open_lazy_state_dict(files) as checkpoint:
            return fingerprint(tower_state_dict(checkpoint, tower))

    return cached_fingerprint(files, "clip-vision", compute)


def stock_tower_fingerprint(stock_key: Any, files: list[Path]) -> str:
    """The fingerprint of a LLaVA checkpoint's own tower (keys matching ``stock_key``), named as a tower's."""
    from .cache import cached_fingerprint
    from .weights import open_lazy_state_dict

    def compute() -> str:
        with open_lazy_state_dict(files) as checkpoint:
            return fingerprint(stock_tower_tensors(checkpoint, stock_key))

    return cached_fingerprint(files, f"stock-tower {stock_key.pattern}", compute)


def stock_tower_tensors(checkpoint: Mapping[str, Any], stock_key: Any) -> dict[str, Any]:
    """A LLaVA checkpoint's own tower tensors, under their ``CLIPVisionModel`` names."""
    found = {}
    for key, value in checkpoint.items():
        match = stock_key.match(key)
        if match:
            found[key[match.end() :]] = value
    return found
