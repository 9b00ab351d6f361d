"""What a preset or model/tower pair resolves to, from configs alone (weights only with ``load``)."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import time
from typing import Any

from .config import ModelOptions
from .errors import ModelLoadError
from .families import Family
from .loader import pads_images, read_llava_config, resolve_prompt_format, tower_to_load
from .vision import fit_problems, fitting_tower_hint, read_tower_config, tower_fingerprint
from .weights import resolve_weight_files, resolved_commit

# bitsandbytes storage per quantized weight, in bytes: NF4 packs two per byte plus a double-quantized
# absmax (8 bit per 64 weights, then fp32 per 256 blocks); LLM.int8 is a byte plus an fp32 scale per row.
NF4_BYTES_PER_WEIGHT = 0.5 + 1 / 64 + 4 / (64 * 256)
HALF_BYTES = 2


def _versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for package in ("safellava", "torch", "transformers", "accelerate", "bitsandbytes"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def _devices() -> list[dict[str, Any]]:
    import torch

    devices: list[dict[str, Any]] = [{"type": "cpu"}]
    for index in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        properties = torch.cuda.get_device_properties(index)
        devices.append(
            {
                "type": "cuda",
                "index": index,
                "name": properties.name,
                "memory_gib": round(properties.total_memory / 2**30, 1),
            }
        )
    if torch.backends.mps.is_available():
        devices.append({"type": "mps"})
    return devices


def parameter_counts(config: Any, family: Family) -> dict[str, int]:
    """Parameters of the tower, projector and language model, counted on the meta device."""
    import torch

    with torch.device("meta"):
        model = family.model_type()(config)
    parts = family.parts(model)

    def count(items: list[Any]) -> int:
        return sum(
            item.numel()
            if isinstance(item, torch.nn.Parameter)
            else sum(p.numel() for p in item.parameters())
            for item in items
        )

    skipped = {family.tower_prefix, *(f"{name}." for name in family.not_quantized)}
    quantized = [
        module
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and not any(f"{name}.".startswith(s) for s in skipped)
    ]
    return {
        "vision_tower": count(parts["vision_tower"]),
        "projector": count(parts["projector"]),
        "language_model": count(parts["language_model"]),
        "total": sum(p.numel() for p in model.parameters()),
        "quantizable": sum(m.weight.numel() for m in quantized),
        "quantizable_rows": sum(m.weight.shape[0] for m in quantized),
    }


def weight_memory(counts: dict[str, int]) -> dict[str, int]:
    """Expected bytes of weights in half precision, with 8-bit and with 4-bit language models."""
    rest = counts["total"] - counts["quantizable"]
    return {
        "none": counts["total"] * HALF_BYTES,
        "8bit": rest * HALF_BYTES + counts["quantizable"] + counts["quantizable_rows"] * 4,
        "4bit": rest * HALF_BYTES + round(counts["quantizable"] * NF4_BYTES_PER_WEIGHT),
    }


def _tower_section(
    options: ModelOptions, llava_config: Any, source: tuple[str, str | None] | None, load: bool
) -> tuple[dict[str, Any], Any]:
    """What info says of the tower, and the vision config of the tower that will run."""
    if source is None:  # the stock tower inside the checkpoint
        return {
            "id": "original",
            "fits": True,
            "problems": [],
            "fingerprint": None,
        }, llava_config.vision_config
    tower = read_tower_config(*source)
    problems = fit_problems(llava_config, tower.config)
    section: dict[str, Any] = {
        "id": options.vision_tower if not options.uses_original_tower else f"original: {source[0]}",
        "revision": source[1],
        "commit": resolved_commit(*source),
        "fits": not problems,
        "problems": problems,
        "fits_hint": None if not problems else fitting_tower_hint(llava_config),
        "shape": {
            k: getattr(tower.config, k)
            for k in ("hidden_size", "image_size", "patch_size", "num_hidden_layers")
        },
        "fingerprint": None,
    }
    try:
        section["fingerprint"] = tower_fingerprint(tower, resolve_weight_files(*source, local_only=not load))
    except ModelLoadError as exc:
        section["fingerprint_note"] = (
            f"not computed: {exc} (weights are read only when on disk, or with --load)"
        )
    return section, tower.config


def tower_parameters(tower_config: Any) -> int:
    """Parameters of a CLIP vision tower with this config, counted on the meta device."""
    import torch
    from transformers import CLIPVisionModel

    with torch.device("meta"):
        return sum(p.numel() for p in CLIPVisionModel(tower_config).parameters())


def setup_report(options: ModelOptions, preset: str | None = None, load: bool = False) -> dict[str, Any]:
    """Everything ``safellava info`` reports, as a JSON-ready dict."""
    config, family = read_llava_config(options)
    tower, tower_config = _tower_section(options, config, tower_to_load(options, config, family), load)
    pads = pads_images(family, config, options)
    processor = family.load_processor(options, config, tower_config, pads)
    counts = parameter_counts(config, family)
    if getattr(config, "original", {}).get("projector") == "linear":
        # The identity that stands in for a linear projector's missing second layer is not the model's.
        identity = config.text_config.hidden_size * (config.text_config.hidden_size + 1)
        counts["projector"] -= identity
        counts["total"] -= identity
    # The tower that runs is counted, fitting or not; the rest is the LLaVA's.
    running = tower_parameters(tower_config)
    counts["total"] += running - counts["vision_tower"]
    counts["vision_tower"] = running
    report: dict[str, Any] = {
        "preset": preset,
        "model": {
            "id": options.model,
            "revision": options.revision,
            "commit": resolved_commit(options.model, options.revision),
            "family": family.name,
            "language_model": config.text_config.model_type,
            "chat_template": bool(getattr(processor, "chat_template", None)),
            "prompt_format": resolve_prompt_format(options, family, config, processor.tokenizer),
            "pads_images": pads,
            "original_pads_images": family.pads(config),
            "vision_feature_layer": config.vision_feature_layer,
        },
        "vision_tower": tower,
        "parameters": {k: v for k, v in counts.items() if not k.startswith("quantizable")},
        "weight_memory_bytes": weight_memory(counts),
        "versions": _versions(),
        "devices": _devices(),
    }
    if load:
        from .loader import load as load_model

        started = time.perf_counter()
        loaded = load_model(
            None, **dataclasses.asdict(options)
        )  # the options are whole; a preset here is only a name
        report["loaded"] = {
            "seconds": round(time.perf_counter() - started, 2),
            "quantize": options.quantize,
            "dtype": str(loaded.model.dtype).removeprefix("torch."),
            "device": loaded.placement.device,
            "memory_footprint_bytes": loaded.model.get_memory_footprint(),
        }
    return report
