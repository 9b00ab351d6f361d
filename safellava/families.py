"""Model families: one entry per kind of LLaVA checkpoint, and everything the rest of the code asks of it.

A family names its transformers class, where its vision tower sits, how the checkpoint names the
stock tower's weights, which modules stay out of quantization, its default prompt format and how
the llava-hf hub layout names its weights (for export). Adding a family is one entry here.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import ModelLoadError


def _llava_format(config: Any, tokenizer: Any) -> str:
    return "llava_v1"


def _next_format(config: Any, tokenizer: Any) -> str:
    """As the original picks it from the model name: 34B (ChatML tokens), Mistral, else Vicuna."""
    if "<|im_start|>" in tokenizer.get_vocab():
        return "chatml_direct"
    if getattr(config.text_config, "model_type", "") == "mistral":
        return "mistral_instruct"
    return "llava_v1"


@dataclass(frozen=True)
class Family:
    """What the code needs to know about one kind of LLaVA checkpoint."""

    name: str  # the config's model_type
    title: str  # for people: "LLaVA-1.5"
    model_class: str  # the transformers class that loads it
    stock_tower_key: re.Pattern[
        str
    ]  # checkpoint keys of its own tower, in the hub and the transformers-5 layout
    not_quantized: tuple[str, ...]  # full module names kept out of bitsandbytes
    hub_layout: tuple[
        tuple[str, str], ...
    ]  # (loaded model's key prefix, llava-hf hub key prefix), for export
    default_format: Callable[[Any, Any], str]  # (config, tokenizer) -> the original's prompt format
    pads_images: bool  # the original pads images to a square (image_aspect_ratio "pad") before the processor
    tower_module: str = "model.vision_tower"  # where the vision tower sits in the loaded model
    projector_modules: tuple[str, ...] = ("model.multi_modal_projector",)  # vision -> text, incl. newline
    language_modules: tuple[str, ...] = ("model.language_model", "lm_head")

    @property
    def tower_prefix(self) -> str:
        """State-dict key prefix of the tower's weights in the loaded model."""
        return f"{self.tower_module}."

    def model_type(self) -> Any:
        """The transformers class (imports transformers)."""
        import transformers

        return getattr(transformers, self.model_class)

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

LLAVA = Family(
    name="llava",
    title="LLaVA-1.5",
    model_class="LlavaForConditionalGeneration",
    stock_tower_key=re.compile(r"^(model\.)?vision_tower\.(vision_model\.)?"),
    not_quantized=("model.vision_tower", "model.multi_modal_projector", "lm_head"),
    hub_layout=_COMMON_LAYOUT,
    default_format=_llava_format,
    pads_images=True,
)

LLAVA_NEXT = Family(
    name="llava_next",
    title="LLaVA-NeXT (1.6)",
    model_class="LlavaNextForConditionalGeneration",
    stock_tower_key=re.compile(r"^(model\.)?vision_tower\.(vision_model\.)?"),
    not_quantized=("model.vision_tower", "model.multi_modal_projector", "model.image_newline", "lm_head"),
    hub_layout=(*_COMMON_LAYOUT, ("model.image_newline", "image_newline")),
    default_format=_next_format,
    pads_images=False,  # anyres tiles, which the llava-hf processor already makes as the original does
    projector_modules=("model.multi_modal_projector", "model.image_newline"),
)

FAMILIES: dict[str, Family] = {family.name: family for family in (LLAVA, LLAVA_NEXT)}


def family_of(config: Any, source: str) -> Family:
    """The family of a checkpoint's config, or a ``ModelLoadError`` naming what is supported."""
    family = FAMILIES.get(getattr(config, "model_type", None) or "")
    if family is None:
        raise ModelLoadError(
            f"model {source} is a {config.model_type!r} checkpoint, not LLaVA 1.5 or 1.6: "
            "use a llava-hf checkpoint such as llava-hf/llava-1.5-7b-hf (see `--preset`)"
        )
    return family
