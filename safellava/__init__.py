"""safellava: safe image-to-text with LLaVA and the Safe-CLIP vision tower.

    import safellava
    m = safellava.load(preset="llava-1.5-7b", quantize="4bit")
    m.caption("photo.jpg")

Importing the package is cheap: torch and transformers load only when a model is.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .config import GenerationOptions, ModelOptions, Preset, available_presets, load_preset
    from .errors import ImageError, IncompatibleTowerError, ModelLoadError, SafeLlavaError, UsageError
    from .images import load_image
    from .loader import load
    from .model import SafeLlava

_EXPORTS = {
    "load": "loader",
    "SafeLlava": "model",
    "load_image": "images",
    "GenerationOptions": "config",
    "ModelOptions": "config",
    "Preset": "config",
    "available_presets": "config",
    "load_preset": "config",
    "SafeLlavaError": "errors",
    "ImageError": "errors",
    "ModelLoadError": "errors",
    "IncompatibleTowerError": "errors",
    "UsageError": "errors",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'safellava' has no attribute {name!r}")
    from importlib import import_module

    return getattr(import_module(f".{module}", __name__), name)
