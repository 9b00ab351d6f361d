"""Caption the same images through the safe tower and the LLaVA's original one, side by side."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from .config import GenerationOptions
from .loader import load_original_tower
from .model import SafeLlava


@dataclass(frozen=True)
class Comparison:
    """One image's captions through both towers, with the same model, prompt and seed."""

    image: str
    safe: str
    original: str


@contextmanager
def swapped_tower(loaded: SafeLlava, tower: Any) -> Iterator[None]:
    """Put another vision tower module into the loaded LLaVA for the duration of the block."""
    inner = loaded.model.model
    kept = inner.vision_tower
    inner.vision_tower = tower
    try:
        yield
    finally:
        inner.vision_tower = kept


class TowerComparer:
    """Holds one language model and both towers; the original tower is loaded once, on first use."""

    def __init__(self, loaded: SafeLlava):
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
        return [Comparison(n, s, o) for n, s, o in zip(names, safe, original, strict=True)]
