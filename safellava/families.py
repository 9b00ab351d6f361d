"""Model families: one entry per kind of LLaVA checkpoint, and everything the rest of the code asks of it.

A family says which checkpoints it reads (from their ``config.json``), how to make its config and
processor, its transformers class, where its vision tower sits and where the stock tower's weights
are, which modules stay out of quantization, its original prompt format and image preparation, and
how the llava-hf hub layout names its weights (for export). Adding a family is one entry here.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import ModelLoadError


def _hf_config(raw: dict[str, Any], source: str, revision: str | None) -> Any:
    from transformers import AutoConfig

    from .errors import load_failure

    try:
        return AutoConfig.from_pretrained(source, revision=revision)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load model {source}: {load_failure(source, exc)}") from None


def _original_config(raw: dict[str, Any], source: str, revision: str | None) -> Any:
    from .original import convert_config

    return convert_config(raw, source)


def _hf_processor(options: Any, config: Any, tower_config: Any, pad: bool) -> Any:
    from .processors import load_hf_processor

    return load_hf_processor(options, pad)


def _original_processor(options: Any, config: Any, tower_config: Any, pad: bool) -> Any:
    from .original import load_processor

    return load_processor(options.model, options.revision, config, tower_config, pad)


def _original_state(checkpoint: dict[str, Any], config: Any) -> dict[str, Any]:
    from .original import converted_state

    return converted_state(checkpoint, config)


def _llava_format(config: Any, tokenizer: Any) -> str:
    return "llava_v1"


def _next_format(config: Any, tokenizer: Any) -> str:
    """As the original picks it from the model name: 34B (ChatML tokens), Mistral, else Vicuna."""
    if "<|im_start|>" in tokenizer.get_vocab():
        return "chatml_direct"
    if getattr(config.text_config, "model_type", "") == "mistral":
        return "mistral_instruct"
    return "llava_v1"


def _original_format(config: Any, tokenizer: Any) -> str:
    from .original import default_format

    return default_format(config)


def _is_original(raw: dict[str, Any]) -> bool:
    from .original import is_original_format

    return is_original_format(raw)


@dataclass(frozen=True)
class Family:
    """What the code needs to know about one kind of LLaVA checkpoint."""

    name: str  # the family's name (for llava-hf checkpoints, their config's model_type)
    title: str  # for people: "LLaVA-1.5"
    model_class: str  # the transformers class it is loaded as
    matches: Callable[[dict[str, Any]], bool]  # (config.json as written) -> whether it is this family's
    # (raw, source, revision) -> transformers config
    read_config: Callable[[dict[str, Any], str, str | None], Any]
    load_processor: Callable[[Any, Any, Any, bool], Any]  # (options, config, tower config, pad) -> processor
    stock_tower_key: re.Pattern[str]  # checkpoint keys of its own tower, in every layout it comes in
    not_quantized: tuple[str, ...]  # full module names kept out of bitsandbytes
    # (loaded model's key prefix, llava-hf hub key prefix), for export
    hub_layout: tuple[tuple[str, str], ...]
    default_format: Callable[[Any, Any], str]  # (config, tokenizer) -> the original's prompt format
    pads: Callable[[Any], bool]  # (config) -> whether the original pads images to a square first
    tower_module: str = "model.vision_tower"  # where the vision tower sits in the loaded model
    projector_modules: tuple[str, ...] = ("model.multi_modal_projector",)  # vision -> text, incl. newline
    language_modules: tuple[str, ...] = ("model.language_model", "lm_head")
    # (checkpoint, config) -> the tensors to load; by default all but the stock tower's
    checkpoint_state: Callable[[dict[str, Any], Any], dict[str, Any]] | None = None
    # (config) -> where its own tower's weights are, when not inside the checkpoint
    stock_tower_source: Callable[[Any], str | None] = lambda config: None

    @property
    def tower_prefix(self) -> str:
        """State-dict key prefix of the tower's weights in the loaded model."""
        return f"{self.tower_module}."

    def model_type(self) -> Any:
        """The transformers class (imports transformers)."""
        import transformers

        return getattr(transformers, self.model_class)

    def state_to_load(self, checkpoint: dict[str, Any], config: Any) -> dict[str, Any]:
        """The checkpoint's tensors to load beside a replacement tower (the stock tower's left unread)."""
        if self.checkpoint_state is not None:
            return self.checkpoint_state(checkpoint, config)
        return {key: value for key, value in checkpoint.items() if not self.stock_tower_key.match(key)}

    def tower(self, model: Any) -> Any:
        """The vision tower module of a loaded model."""
        return model.get_submodule(self.tower_module)

    def set_tower(self, model: Any, tower: Any) -> None:
        """Put another vision tower module into a loaded model."""
        parent, _, name = self.tower_module.rpartition(".")
        setattr(model.get_submodule(parent), name, tower)

    def parts(self, model: Any) -> dict[str, list[Any]]:
        """The model's modules and parameters by part: vision tower, projector, language model."""

        def get(name: str) -> Any:
            parent, _, attribute = name.rpartition(".")
            return getattr(model.get_submodule(parent), attribute)

        return {
            "vision_tower": [self.tower(model)],
            "projector": [get(name) for name in self.projector_modules],
            "language_model": [get(name) for name in self.language_modules],
        }

    def hub_key(self, key: str) -> str:
        """A loaded model's state-dict key under the llava-hf hub naming, which serving engines expect."""
        for loaded_prefix, hub_prefix in self.hub_layout:
            if key == loaded_prefix or key.startswith(f"{loaded_prefix}."):
                return hub_prefix + key[len(loaded_prefix) :]
        raise ModelLoadError(f"{self.title}: weight {key} has no place in the llava-hf layout")


_COMMON_LAYOUT = (
    ("model.vision_tower", "vision_tower.vision_model"),
    ("model.multi_modal_projector", "multi_modal_projector"),
    ("model.language_model", "language_model.model"),
    ("lm_head", "language_model.lm_head"),
)
# The stock tower's keys in llava-hf checkpoints (hub and transformers-5 layouts), and in exports.
HF_TOWER_KEY = re.compile(r"^(model\.)?vision_tower\.(vision_model\.)?")

ORIGINAL = Family(
    name="llava_original",
    title="original-format LLaVA",
    model_class="LlavaForConditionalGeneration",
    matches=_is_original,
    read_config=_original_config,
    load_processor=_original_processor,
    stock_tower_key=re.compile(r"^model\.vision_tower\.vision_tower\.(vision_model\.)?"),
    not_quantized=("model.vision_tower", "model.multi_modal_projector", "lm_head"),
    hub_layout=_COMMON_LAYOUT,
    default_format=_original_format,
    pads=lambda config: config.original["image_aspect_ratio"] == "pad",
    checkpoint_state=_original_state,
    stock_tower_source=lambda config: config.original["mm_vision_tower"],
)

LLAVA = Family(
    name="llava",
    title="LLaVA-1.5",
    model_class="LlavaForConditionalGeneration",
    matches=lambda raw: raw.get("model_type") == "llava",
    read_config=_hf_config,
    load_processor=_hf_processor,
    stock_tower_key=HF_TOWER_KEY,
    not_quantized=("model.vision_tower", "model.multi_modal_projector", "lm_head"),
    hub_layout=_COMMON_LAYOUT,
    default_format=_llava_format,
    pads=lambda config: True,
)

LLAVA_NEXT = Family(
    name="llava_next",
    title="LLaVA-NeXT (1.6)",
    model_class="LlavaNextForConditionalGeneration",
    matches=lambda raw: raw.get("model_type") == "llava_next",
    read_config=_hf_config,
    load_processor=_hf_processor,
    stock_tower_key=HF_TOWER_KEY,
    not_quantized=("model.vision_tower", "model.multi_modal_projector", "model.image_newline", "lm_head"),
    hub_layout=(*_COMMON_LAYOUT, ("model.image_newline", "image_newline")),
    default_format=_next_format,
    # Anyres tiles, which the llava-hf processor already makes as the original does.
    pads=lambda config: False,
    projector_modules=("model.multi_modal_projector", "model.image_newline"),
)

# In the order they are tried: an original-format config can say model_type "llava" too.
FAMILIES: dict[str, Family] = {family.name: family for family in (ORIGINAL, LLAVA, LLAVA_NEXT)}


def family_of(raw: dict[str, Any], source: str) -> Family:
    """The family of a checkpoint's ``config.json``, or a ``ModelLoadError`` naming what is supported."""
    for family in FAMILIES.values():
        if family.matches(raw):
            return family
    kind = raw.get("model_type") or "unknown"
    raise ModelLoadError(
        f"model {source} is a {kind!r} checkpoint, not LLaVA 1.5 or 1.6: use a llava-hf checkpoint such "
        "as llava-hf/llava-1.5-7b-hf or an original-format LLaVA such as liuhaotian/llava-v1.5-13b (see `--preset`)"
    )
