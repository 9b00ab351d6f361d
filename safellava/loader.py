"""Load a LLaVA and its processor, put the Safe-CLIP tower in, optionally quantize the LM."""

from __future__ import annotations

import contextlib
import copy
from typing import Any

from .config import ModelOptions, Preset, resolve_options
from .devices import Placement, resolve_placement
from .errors import ModelLoadError
from .model import SafeLlava
from .prompts import detect_format
from .vision import STOCK_TOWER_KEY, TOWER_PREFIX, check_tower_fits, read_tower_config, tower_state_dict
from .weights import missing_folder, open_lazy_state_dict, resolve_weight_files

# Kept out of bitsandbytes: full module names, because a bare "vision_tower" would not match
# "model.vision_tower.encoder..." (patterns match a name's start or its end).
NOT_QUANTIZED = ["model.vision_tower", "model.multi_modal_projector", "model.image_newline", "lm_head"]
FAMILIES = {"llava": "LlavaForConditionalGeneration", "llava_next": "LlavaNextForConditionalGeneration"}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def read_llava_config(options: ModelOptions) -> Any:
    """The LLaVA checkpoint's config, refusing anything that is not LLaVA 1.5 or 1.6."""
    from transformers import AutoConfig

    if missing_folder(options.model):
        raise ModelLoadError(f"model folder {options.model} does not exist")
    try:
        config = AutoConfig.from_pretrained(options.model, revision=options.revision)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load model {options.model}: {_first_line(exc)}") from None
    if config.model_type not in FAMILIES:
        raise ModelLoadError(
            f"model {options.model} is a {config.model_type!r} checkpoint, not LLaVA 1.5 or 1.6: "
            "use a llava-hf checkpoint such as llava-hf/llava-1.5-7b-hf (see `--preset`)"
        )
    return config


def quantization_config(quantize: str, dtype: Any) -> Any:
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
            llm_int8_skip_modules=NOT_QUANTIZED,
        )
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=NOT_QUANTIZED)


def load_processor(options: ModelOptions) -> Any:
    """The checkpoint's processor, padding on the left for batched generation."""
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(options.model, revision=options.revision)
    except (OSError, ValueError, TypeError) as exc:
        raise ModelLoadError(f"cannot load the processor of {options.model}: {_first_line(exc)}") from None
    processor.tokenizer.padding_side = "left"
    return processor


def _load_kwargs(options: ModelOptions, placement: Placement) -> dict[str, Any]:
    return {
        "dtype": placement.dtype,
        "device_map": placement.device_map,
        "quantization_config": quantization_config(options.quantize, placement.dtype),
    }


def _from_pretrained(model_class: Any, name: str, *args: Any, **kwargs: Any) -> Any:
    import torch

    try:
        return model_class.from_pretrained(*args, **kwargs)
    except torch.OutOfMemoryError:
        raise ModelLoadError(
            f"out of memory loading {name}: try --quantize 4bit or a smaller preset"
        ) from None
    except (OSError, ImportError, ValueError) as exc:
        raise ModelLoadError(f"cannot load model {name}: {_first_line(exc)}") from None


def _load_with_tower(model_class: Any, config: Any, options: ModelOptions, placement: Placement) -> Any:
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
        state = {key: value for key, value in llava.items() if not STOCK_TOWER_KEY.match(key)}
        state.update(tower_state_dict(clip, tower))
        model, info = _from_pretrained(
            model_class,
            options.model,
            None,
            config=config,
            state_dict=state,
            output_loading_info=True,
            **_load_kwargs(options, placement),
        )
    _check_tower_loaded(info, options.vision_tower)
    model.config.name_or_path = options.model
    _load_generation_config(model, options)
    return model


def _check_tower_loaded(info: dict[str, Any], tower: str) -> None:
    """Every tower weight must have been loaded: a partial load is an error, never a warning."""
    bad = sorted(
        key
        for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")
        for key in info.get(kind, ())
        if (key[0] if isinstance(key, tuple) else key).startswith(TOWER_PREFIX)
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
    import transformers

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

    config = read_llava_config(options)
    model_class = getattr(transformers, FAMILIES[config.model_type])
    processor = load_processor(options)
    if options.uses_original_tower:
        loaded = _from_pretrained(
            model_class,
            options.model,
            options.model,
            revision=options.revision,
            **_load_kwargs(options, placement),
        )
    else:
        loaded = _load_with_tower(model_class, config, options, placement)
    loaded.eval()

    prompt_format = options.prompt_format
    if prompt_format == "auto":
        prompt_format = detect_format(config, processor.tokenizer)
    return SafeLlava(
        model=loaded,
        processor=processor,
        options=options,
        placement=placement,
        family=config.model_type,
        prompt_format=prompt_format,
        generation=generation_options,
        preset=preset_name,
    )


def load_original_tower(loaded: SafeLlava) -> Any:
    """The LLaVA checkpoint's own CLIP tower, as a module beside the loaded model (for compare).

    Only the stock tower's tensors are read; it gets the device and dtype of the loaded tower.
    """
    from transformers import CLIPVisionModel

    config = read_llava_config(loaded.options)
    reference = next(loaded.model.model.vision_tower.parameters())
    files = resolve_weight_files(loaded.options.model, loaded.options.revision)
    with open_lazy_state_dict(files) as llava:
        state = {}
        for key, value in llava.items():
            match = STOCK_TOWER_KEY.match(key)
            if match:
                state[key[match.end() :].removeprefix("vision_model.")] = value
        tower, info = _from_pretrained(
            CLIPVisionModel,
            f"{loaded.options.model} (its own vision tower)",
            None,
            config=config.vision_config,
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
