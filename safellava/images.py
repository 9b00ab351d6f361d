"""Open and validate images (path, URL, bytes, PIL) -> RGB PIL images, with one-line errors."""

from __future__ import annotations

import contextlib
import io
import os
import urllib.error
import urllib.request
import warnings
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageError

ImageSource = str | os.PathLike | bytes | Image.Image

DEFAULT_MAX_PIXELS = 64_000_000  # about 8000 x 8000; bigger files are refused (decompression bombs)
URL_TIMEOUT_S = 30


def describe(source: ImageSource) -> str:
    """A short name for an image source, for messages and output records."""
    if isinstance(source, Image.Image):
        return getattr(source, "filename", "") or "<image>"
    if isinstance(source, bytes):
        return "<bytes>"
    return os.fspath(source)


def _read_source(source: str | os.PathLike | bytes, name: str) -> bytes:
    if isinstance(source, bytes):
        return source
    text = os.fspath(source)
    if isinstance(text, str) and text.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(text, timeout=URL_TIMEOUT_S) as response:
                return response.read()
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ImageError(name, f"cannot download ({reason})") from None
    path = Path(text)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ImageError(name, "no such file") from None
    except IsADirectoryError:
        raise ImageError(name, "is a folder, not an image file") from None
    except PermissionError:
        raise ImageError(name, "permission denied") from None
    except OSError as exc:
        raise ImageError(name, f"cannot read ({exc.strerror or exc})") from None


def _decode(data: bytes, name: str, max_pixels: int) -> Image.Image:
    if not data:
        raise ImageError(name, "empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            pixels = image.width * image.height
            if pixels > max_pixels:
                raise ImageError(
                    name, f"image too large ({image.width}x{image.height} px, limit {max_pixels} pixels)"
                )
            image.load()
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(name, "not an image file (unrecognised format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(name, "image too large (decompression bomb)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(name, f"corrupt or truncated image ({exc})") from None
    return image


def _to_8bit(image: Image.Image) -> Image.Image:
    """Scale 16- and 32-bit single-channel images to 8-bit grayscale."""
    import numpy as np

    values = np.asarray(image, dtype=np.float64)
    top = 65535.0 if values.max(initial=0) > 255 else 255.0
    return Image.fromarray(np.clip(values / top * 255.0, 0, 255).round().astype(np.uint8), mode="L")


def to_rgb(image: Image.Image) -> Image.Image:
    """Apply EXIF orientation and convert any mode to RGB (transparency onto white)."""
    # Unreadable EXIF: keep the stored orientation rather than fail the image.
    with contextlib.suppress(OSError, ValueError, SyntaxError, TypeError):
        image = ImageOps.exif_transpose(image)
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        image = _to_8bit(image)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode != "RGB":
        return image.convert("RGB")
    return image


def load_image(source: ImageSource, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open an image from a path, URL, bytes or PIL image as an upright RGB image."""
    name = describe(source)
    if isinstance(source, Image.Image):
        return to_rgb(source)
    image = _decode(_read_source(source, name), name, max_pixels)
    try:
        return to_rgb(image)
    except (OSError, ValueError) as exc:
        raise ImageError(name, f"cannot convert to RGB ({exc})") from None
