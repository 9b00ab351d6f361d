"""Load a LLaVA and its processor, put the Safe-CLIP tower in, optionally quantize the LM."""

from __future__ import annotations

import contextlib
import copy
import pickle
from typing import Any

from .config import ModelOptions, Preset, resolve_options
from .devices import Placement, resolve_placement
from .errors import ModelLoadError, load_failure
from .families import Family, family_of
from .model import SafeLlava
from .vision import check_tower_fits, read_tower_config, stock_tower_tensors, tower_state_dict
from .weights import PICKLE_REFUSED, missing_folder, open_lazy_state_dict, resolve_weight_files


def read_llava_config(options: ModelOptions) -> tuple[Any, Family]:
    """The LLaVA checkpoint's config and family, refusing anything that is not a known LLaVA."""
    from transformers import AutoConfig

    if missing_folder(options.model):
        raise ModelLoadError(f"model folder {options.model} does not exist")
    try:
        config = AutoConfig.from_pretrained(options.model, revision=options.revision)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"cannot load model {options.model}: {load_failure(options.model, exc)}"
        ) from None
    return config, family_of(config, options.model)


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


def load_processor(options: ModelOptions, family: Family) -> Any:
    """The checkpoint's processor as the original preprocesses: PIL image processing, padding where it pads.

    Tokens are padded on the left for batched generation.
    """
    from transformers import AutoProcessor

    try:
        # The PIL backend, as the original LLaVA's CLIPImageProcessor, also where torchvision is installed.
        processor = AutoProcessor.from_pretrained(options.model, revision=options.revision, backend="pil")
    except (OSError, ValueError, TypeError) as exc:
        raise ModelLoadError(
            f"cannot load the processor of {options.model}: {load_failure(options.model, exc)}"
        ) from None
    processor.tokenizer.padding_side = "left"
    if family.pads_images and options.pad_images:
        processor.image_processor = padding_image_processor(processor.image_processor)
    return processor


def padding_image_processor(image_processor: Any) -> Any:
    """The same image processor, padding each image to a square of the mean colour first.

    That is the original's ``expand2square(image, tuple(int(x * 255) for x in image_mean))``
    followed by the CLIP processor: nothing of a wide or tall image is cropped away.
    """
    from transformers import LlavaImageProcessorPil

    settings = {
        k: v
        for k, v in image_processor.to_dict().items()
        if k not in ("image_processor_type", "processor_class")
    }
    return LlavaImageProcessorPil(**{**settings, "do_pad": True})


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


def _load_with_tower(family: Family, config: Any, options: ModelOptions, placement: Placement) -> Any:
    """One ``from_pretrained`` pass over the LLaVA's weights with the tower's in place of its own.

    The stock tower's tensors are never read and the tower's text half never leaves the disk:
    both checkpoints are opened lazily and only the kept tensors are materialized.
    """
    tower = read_tower_config(options.vision_tower, options.tower_revision)
    check_tower_fits(config, tower, options.model)
    llava_files = resolve_weight_files(options.model, options.revision)
    tower_files = resolve_weight_files(options.vision_tower, options.tower_revision)
    config = copy.deepcopy(config)
    config.vision_config = copy.deepcopy(tower.config)
    with open_lazy_state_dict(llava_files) as llava, open_lazy_state_dict(tower_files) as clip:
        state = {key: value for key, value in llava.items() if not family.stock_tower_key.match(key)}
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
    _check_tower_loaded(info, options.vision_tower, family.tower_prefix)
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
        **generation,
    )
    placement = resolve_placement(options.device, options.dtype, options.quantize)

    config, family = read_llava_config(options)
    processor = load_processor(options, family)
    if options.uses_original_tower:
        loaded = _from_pretrained(
            family.model_type(),
            options.model,
            options.model,
            revision=options.revision,
            **_load_kwargs(options, placement, family),
        )
    else:
        loaded = _load_with_tower(family, config, options, placement)
    loaded.eval()

    prompt_format = options.prompt_format
    if prompt_format == "auto":
        prompt_format = family.default_format(config, processor.tokenizer)
    return SafeLlava(
        model=loaded,
        processor=processor,
        options=options,
        placement=placement,
        family=family,
        prompt_format=prompt_format,
        generation=generation_options,
        preset=preset_name,
    )


def load_original_tower(loaded: SafeLlava) -> Any:
    """The LLaVA checkpoint's own CLIP tower, as a module beside the loaded model (for compare).

    Only the stock tower's tensors are read; it gets the device and dtype of the loaded tower.
    """
    from transformers import CLIPVisionModel

    config, family = read_llava_config(loaded.options)
    reference = next(family.tower(loaded.model).parameters())
    files = resolve_weight_files(loaded.options.model, loaded.options.revision)
    with open_lazy_state_dict(files) as llava:
        tower, info = _from_pretrained(
            CLIPVisionModel,
            f"{loaded.options.model} (its own vision tower)",
            None,
            config=config.vision_config,
            state_dict=stock_tower_tensors(llava, family.stock_tower_key),
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
