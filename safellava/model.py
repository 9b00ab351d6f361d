"""The loaded model: LLaVA with its vision tower, the processor, and what produced them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .config import GenerationOptions, ModelOptions, override
from .devices import Placement
from .generate import BatchSizer, StreamingAnswer, caption_batch, stream_answer
from .images import ImageSource, load_image
from .prompts import render_prompt, single_turn


@dataclass
class SafeLlava:
    """A LLaVA ready to caption: ``model`` and ``processor`` are the transformers objects."""

    model: Any
    processor: Any
    options: ModelOptions  # what was asked for: checkpoints, revisions, quantization
    placement: Placement  # where it runs and in which dtype
    family: str  # "llava" (1.5) or "llava_next" (1.6)
    prompt_format: str  # built-in format used when the checkpoint has no chat template
    generation: GenerationOptions = field(default_factory=GenerationOptions)  # defaults
    preset: str | None = None
    _sizer: BatchSizer | None = field(default=None, repr=False)

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

    def record(self) -> dict[str, Any]:
        """The fields that name what produced an output: model, tower, revisions, quantization, preset."""
        return {
            "model": self.model_id,
            "vision_tower": self.vision_tower,
            "revision": self.options.revision,
            "tower_revision": self.options.tower_revision,
            "quantize": self.options.quantize,
            "preset": self.preset,
        }

    def caption_images(self, images: Sequence[Any], options: GenerationOptions) -> list[str]:
        """Captions for already opened RGB images, in batches of ``options.batch_size``."""
        # An out-of-memory cut holds while the same batch size is asked for; a new size starts afresh.
        if self._sizer is None or self._sizer.requested != options.batch_size:
            self._sizer = BatchSizer(options.batch_size)
        return self._sizer.run(
            list(images),
            lambda chunk: caption_batch(self.model, self.processor, chunk, options, self.prompt_format),
        )

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
        text = render_prompt(self.processor, single_turn(options.prompt, options.system), self.prompt_format)
        return stream_answer(self.model, self.processor, text, load_image(image), options)
