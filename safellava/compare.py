"""Caption the same images through the safe tower and the LLaVA's original one, side by side."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from .config import GenerationOptions, ModelOptions
from .errors import UsageError
from .loader import load_original_tower
from .model import SafeLlava
from .records import CaptionRecord


def check_comparable(options: ModelOptions) -> None:
    """Refuse a setup that already runs the original tower: there would be nothing to compare."""
    if options.uses_original_tower:
        raise UsageError("compare sets the safe tower against the original one: give a safe --vision-tower")


@dataclass(frozen=True)
class Comparison:
    """One image's captions through both towers, with the same model, prompt and seed."""

    record: CaptionRecord  # the safe tower's caption, with what produced it
    original: str  # the caption through the checkpoint's own tower
    original_tower: str  # what that tower is, in words

    @property
    def image(self) -> str:
        """The image, as named by the user."""
        return self.record.image

    @property
    def safe(self) -> str:
        """The caption through the safe tower."""
        return self.record.caption

    def to_dict(self) -> dict[str, Any]:
        """The caption record of the safe caption, with ``safe``, ``original`` and ``original_tower`` beside it."""
        return {
            **self.record.to_dict(),
            "safe": self.safe,
            "original": self.original,
            "original_tower": self.original_tower,
            "seed": self.record.generation.seed,
        }


@contextmanager
def swapped_tower(loaded: SafeLlava, tower: Any) -> Iterator[None]:
    """Put another vision tower module into the loaded LLaVA for the duration of the block."""
    kept = loaded.family.tower(loaded.model)
    loaded.family.set_tower(loaded.model, tower)
    try:
        yield
    finally:
        loaded.family.set_tower(loaded.model, kept)


class TowerComparer:
    """Holds one language model and both towers; the original tower is loaded once, on first use."""

    def __init__(self, loaded: SafeLlava):
        check_comparable(loaded.options)
        self.loaded = loaded
        self._original: Any = None

    @property
    def original_tower(self) -> Any:
        """The LLaVA checkpoint's own CLIP tower (loaded on first use)."""
        if self._original is None:
            self._original = load_original_tower(self.loaded)
        return self._original

    def compare(
        self, names: Sequence[str], images: Sequence[Any], options: GenerationOptions
    ) -> list[Comparison]:
        """Captions of each image through the safe tower, then through the original one."""
        safe = self.loaded.caption_images(images, options)
        with swapped_tower(self.loaded, self.original_tower):
            original = self.loaded.caption_images(images, options)
        described = f"{self.loaded.model_id} (its own CLIP tower)"
        return [
            Comparison(self.loaded.record(name, s, options), o, described)
            for name, s, o in zip(names, safe, original, strict=True)
        ]
