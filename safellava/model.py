"""The loaded model: LLaVA with its vision tower, the processor, its engine, and what produced them."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .config import GenerationOptions, ModelOptions, override
from .devices import Placement
from .families import Family
from .generate import Engine, StreamingAnswer
from .images import ImageSource, load_image
from .records import CaptionRecord, GenerationSettings, Provenance


@dataclass
class SafeLlava:
    """A LLaVA ready to caption: ``model`` and ``processor`` are the transformers objects."""

    model: Any
    processor: Any
    options: ModelOptions  # what was asked for: checkpoints, revisions, quantization
    placement: Placement  # where it runs and in which dtype
    family: Family  # LLaVA-1.5 or LLaVA-NeXT: class, tower, layout
    prompt_format: str  # built-in format used when the checkpoint has no chat template
    generation: GenerationOptions = field(default_factory=GenerationOptions)  # defaults
    preset: str | None = None
    # The tower checkpoint loaded in, and its revision; None: the stock one inside.
    tower_source: tuple[str, str | None] | None = None
    pads_images: bool = False  # images padded to a square before the processor, as the original
    engine: Any = field(default=None, repr=False)  # an Engine on model and processor, unless given (vLLM)

    def __post_init__(self) -> None:
        if self.engine is None:
            self.engine = Engine(self.model, self.processor, self.prompt_format)

    @property
    def model_id(self) -> str:
        """The LLaVA checkpoint: hub id or folder."""
        return self.options.model

    @property
    def vision_tower(self) -> str:
        """The vision tower checkpoint, or ``"original"`` for the LLaVA's own CLIP."""
        return self.options.vision_tower

    def generation_options(self, **overrides: Any) -> GenerationOptions:
        """The default generation options with the given (non-None) fields replaced."""
        return override(self.generation, **overrides)

    @functools.cached_property
    def tower_fingerprint(self) -> str:
        """sha256 of the running tower's weights as its checkpoint stores them (computed once, cached on disk)."""
        from .vision import read_tower_config, stock_tower_fingerprint, tower_fingerprint
        from .weights import resolve_weight_files

        if self.tower_source is None:
            files = resolve_weight_files(self.options.model, self.options.revision)
            return stock_tower_fingerprint(self.family.stock_tower_key, files)
        tower = read_tower_config(*self.tower_source)
        return tower_fingerprint(tower, resolve_weight_files(*self.tower_source))

    @functools.cached_property
    def provenance(self) -> Provenance:
        """What produced this model's outputs: checkpoints, revisions, quantization, preset, tower fingerprint."""
        return Provenance(
            model=self.model_id,
            vision_tower=self.vision_tower,
            revision=self.options.revision,
            tower_revision=self.options.tower_revision,
            quantize=self.options.quantize,
            preset=self.preset,
            tower_fingerprint=self.tower_fingerprint,
            prompt_format=self.prompt_format,
        )

    def record(self, image: str, caption: str, options: GenerationOptions) -> CaptionRecord:
        """The record of one caption made with ``options``."""
        return CaptionRecord(
            image=image,
            caption=caption,
            prompt=options.prompt,
            provenance=self.provenance,
            generation=GenerationSettings.of(options),
        )

    def caption_images(self, images: Sequence[Any], options: GenerationOptions) -> list[str]:
        """Captions for already opened RGB images, in batches of ``options.batch_size``."""
        return self.engine.caption_all(list(images), options)

    def caption(
        self,
        images: ImageSource | Sequence[ImageSource],
        prompt: str | None = None,
        **generation: Any,
    ) -> str | list[str]:
        """Caption one image (-> str) or several (-> list[str], batched)."""
        single = not isinstance(images, (list, tuple))
        sources = [images] if single else list(images)
        opened = [load_image(source) for source in sources]
        captions = self.caption_images(opened, self.generation_options(prompt=prompt, **generation))
        return captions[0] if single else captions

    def stream(self, image: ImageSource, prompt: str | None = None, **generation: Any) -> StreamingAnswer:
        """Caption one image, yielding the text as it is generated."""
        options = self.generation_options(prompt=prompt, **generation)
        inputs = self.engine.prepare([load_image(image)], [self.engine.caption_prompt(options)])
        return self.engine.stream(inputs, options)
