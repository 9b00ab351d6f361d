"""Load a LLaVA and its processor, put the Safe-CLIP tower in, optionally quantize the LM."""

from __future__ import annotations

import contextlib
import copy
import pickle
from dataclasses import dataclass
from typing import Any

from .config import ModelOptions, Preset, resolve_options
from .devices import Placement, resolve_placement
from .errors import ModelLoadError, load_failure
from .families import Family, family_of
from .model import SafeLlava
from .vision import TowerSpec, check_tower_fits, read_tower_config, stock_tower_tensors, tower_state_dict
from .weights import PICKLE_REFUSED, missing_folder, open_lazy_state_dict, resolve_weight_files


def read_llava_config(options: ModelOptions) -> tuple[Any, Family]:
    """The LLaVA checkpoint's config and family, refusing anything that is not a known LLaVA."""
    from .original import read_raw_config

    if missing_folder(options.model):
        raise ModelLoadError(f"model folder {options.model} does not exist")
    raw = read_raw_config(options.model, options.revision)
    if raw is None:
        raise ModelLoadError(f"cannot load model {options.model}: it has no config.json")
    family = family_of(raw, options.model)
    return family.read_config(raw, options.model, options.revision), family


@dataclass(frozen=True)
class Setup:
    """A model setup checked from configs alone: what will load, before any weight is read."""

    config: Any  # the LLaVA's transformers config
    family: Family
    # The tower checkpoint to put in, and its revision; None: its own.
    tower_source: tuple[str, str | None] | None
    tower: TowerSpec | None  # that tower's config (checked to fit)
    pads_images: bool  # images padded to a square first, as the original (and --no-pad allows)


def check_setup(options: ModelOptions) -> Setup:
    """Read the configs and check that the tower fits: the errors a load would end with, in seconds."""
    config, family = read_llava_config(options)
    source = tower_to_load(options, config, family)
    tower = None if source is None else read_tower_config(*source)
    if tower is not None:
        check_tower_fits(config, tower, options.model)
    return Setup(config, family, source, tower, pads_images(family, config, options))


def pads_images(family: Family, config: Any, options: ModelOptions) -> bool:
    """Whether images are padded to a square first: the original does, and ``--no-pad`` is not given."""
    return family.pads(config) and options.pad_images


def resolve_prompt_format(options: ModelOptions, family: Family, config: Any, tokenizer: Any) -> str:
    """The prompt format asked for; for ``auto``, the one the original code uses for this checkpoint."""
    if options.prompt_format == "auto":
        return family.default_format(config, tokenizer)
    return options.prompt_format


def tower_to_load(options: ModelOptions, config: Any, family: Family) -> tuple[str, str | None] | None:
    """The tower checkpoint to put into the model, and its revision; None for the stock tower inside it."""
    if not options.uses_original_tower:
        return options.vision_tower, options.tower_revision
    source = family.stock_tower_source(config)
    return None if source is None else (source, None)


def quantization_config(quantize: str, dtype: Any, family: Family) -> Any:
    """bitsandbytes settings for the language model: NF4 + double quantization, or LLM.int8."""
    if quantize == "none":
        return None
    from transformers import BitsAndBytesConfig

    if quantize == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            llm_int8_skip_modules=list(family.not_quantized),
        )
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(family.not_quantized))


def _load_kwargs(options: ModelOptions, placement: Placement, family: Family) -> dict[str, Any]:
    return {
        "dtype": placement.dtype,
        "device_map": placement.device_map,
        "quantization_config": quantization_config(options.quantize, placement.dtype, family),
    }


def _from_pretrained(model_class: Any, name: str, *args: Any, **kwargs: Any) -> Any:
    import torch

    try:
        return model_class.from_pretrained(*args, **kwargs)
    except torch.OutOfMemoryError:
        raise ModelLoadError(
            f"out of memory loading {name}: try --quantize 4bit or a smaller preset"
        ) from None
    except pickle.UnpicklingError:
        raise ModelLoadError(f"cannot load model {name}: {PICKLE_REFUSED}") from None
    except (OSError, ImportError, ValueError) as exc:
        raise ModelLoadError(f"cannot load model {name}: {load_failure(name, exc)}") from None


def _load_with_tower(
    family: Family,
    config: Any,
    options: ModelOptions,
    placement: Placement,
    tower: TowerSpec,
    revision: str | None,
) -> Any:
    """One ``from_pretrained`` pass over the LLaVA's weights with the tower's in place of its own.

    The stock tower's tensors are never read and the tower's text half never leaves the disk:
    both checkpoints are opened lazily and only the kept tensors are materialized.
    """
    llava_files = resolve_weight_files(options.model, options.revision)
    tower_files = resolve_weight_files(tower.source, revision)
    config = copy.deepcopy(config)
    config.vision_config = copy.deepcopy(tower.config)
    with open_lazy_state_dict(llava_files) as llava, open_lazy_state_dict(tower_files) as clip:
        state = family.state_to_load(llava, config)
        state.update(tower_state_dict(clip, tower, family.tower_prefix))
        model, info = _from_pretrained(
            family.model_type(),
            options.model,
            None,
            config=config,
            state_dict=state,
            output_loading_info=True,
            **_load_kwargs(options, placement, family),
        )
    _check_tower_loaded(info, tower.source, family.tower_prefix)
    model.config.name_or_path = options.model
    _load_generation_config(model, options)
    return model


def _check_tower_loaded(info: dict[str, Any], tower: str, prefix: str) -> None:
    """Every tower weight must have been loaded: a partial load is an error, never a warning."""
    bad = sorted(
        key
        for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")
        for key in info.get(kind, ())
        if (key[0] if isinstance(key, tuple) else key).startswith(prefix)
    )
    if bad:
        raise ModelLoadError(
            f"vision tower {tower} did not load completely ({len(bad)} weights, first: {bad[0]})"
        )


def _load_generation_config(model: Any, options: ModelOptions) -> None:
    from transformers import GenerationConfig

    # Without a generation_config.json, the defaults derived from the model config stay.
    with contextlib.suppress(OSError):
        model.generation_config = GenerationConfig.from_pretrained(options.model, revision=options.revision)


def load(
    preset: str | Preset | None = None,
    *,
    model: str | None = None,
    vision_tower: str | None = None,
    revision: str | None = None,
    tower_revision: str | None = None,
    quantize: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    prompt_format: str | None = None,
    pad_images: bool | None = None,
    **generation: Any,
) -> SafeLlava:
    """Load a LLaVA with the Safe-CLIP tower (or ``vision_tower="original"``), ready to caption.

    ``preset`` is a preset name or YAML path (default ``llava-1.5-7b``); keyword arguments override
    it, and any ``GenerationOptions`` field (``max_new_tokens``, ``temperature``...) sets a default.
    """
    options, generation_options, preset_name = resolve_options(
        preset,
        model=model,
        vision_tower=vision_tower,
        revision=revision,
        tower_revision=tower_revision,
        quantize=quantize,
        device=device,
        dtype=dtype,
        prompt_format=prompt_format,
        pad_images=pad_images,
        **generation,
    )
    placement = resolve_placement(options.device, options.dtype, options.quantize)

    setup = check_setup(options)
    family, config, tower = setup.family, setup.config, setup.tower
    vision_config = tower.config if tower else config.vision_config
    processor = family.load_processor(options, config, vision_config, setup.pads_images)
    if tower is None:  # the stock tower inside the checkpoint
        loaded = _from_pretrained(
            family.model_type(),
            options.model,
            options.model,
            revision=options.revision,
            **_load_kwargs(options, placement, family),
        )
    else:
        assert setup.tower_source is not None
        loaded = _load_with_tower(family, config, options, placement, tower, setup.tower_source[1])
    loaded.eval()
    return SafeLlava(
        model=loaded,
        processor=processor,
        options=options,
        placement=placement,
        family=family,
        prompt_format=resolve_prompt_format(options, family, config, processor.tokenizer),
        generation=generation_options,
        preset=preset_name,
        tower_source=setup.tower_source,
        pads_images=setup.pads_images,
    )


def load_original_tower(loaded: SafeLlava) -> Any:
    """The LLaVA's own CLIP tower, as a module beside the loaded model (for compare).

    Only the stock tower's tensors are read (from the checkpoint, or from the tower checkpoint an
    original-format LLaVA names); it gets the device and dtype of the loaded tower.
    """
    from transformers import CLIPVisionModel

    config, family = read_llava_config(loaded.options)
    reference = next(family.tower(loaded.model).parameters())
    source = family.stock_tower_source(config)
    if source is None:  # inside the LLaVA checkpoint
        files = resolve_weight_files(loaded.options.model, loaded.options.revision)
        vision_config = config.vision_config

        def select(checkpoint: dict[str, Any]) -> dict[str, Any]:
            return stock_tower_tensors(checkpoint, family.stock_tower_key)
    else:  # a CLIP checkpoint of its own
        stock = read_tower_config(source)
        files, vision_config = resolve_weight_files(source), stock.config

        def select(checkpoint: dict[str, Any]) -> dict[str, Any]:
            return tower_state_dict(checkpoint, stock)

    with open_lazy_state_dict(files) as checkpoint:
        state = select(checkpoint)
        tower, info = _from_pretrained(
            CLIPVisionModel,
            f"{loaded.options.model} (its own vision tower)",
            None,
            config=vision_config,
            state_dict=state,
            output_loading_info=True,
            dtype=reference.dtype,
            device_map={"": reference.device},
        )
    if info["missing_keys"] or info["mismatched_keys"]:
        missing = sorted(info["missing_keys"]) or sorted(str(k) for k in info["mismatched_keys"])
        raise ModelLoadError(
            f"the vision tower of {loaded.options.model} is incomplete (first: {missing[0]})"
        )
    return tower.eval()
