"""Open and validate images (path, URL, bytes, PIL) -> RGB PIL images, with one-line errors."""

from __future__ import annotations

import contextlib
import io
import os
import stat
import urllib.error
import urllib.request
from typing import BinaryIO

from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageError

ImageSource = str | os.PathLike | bytes | Image.Image

DEFAULT_MAX_PIXELS = 64_000_000  # about 8000 x 8000; bigger files are refused (decompression bombs)
MAX_ASPECT_RATIO = 50  # thinner images would grow huge when their short side is resized to the model's
URL_TIMEOUT_S = 30
MAX_IMAGE_BYTES = 512 * 2**20  # an image file of more cannot be under the pixel limit; never read further


def source_name(source: ImageSource) -> str:
    """A short name for an image source, for messages and output records."""
    if isinstance(source, Image.Image):
        return getattr(source, "filename", "") or "<image>"
    if isinstance(source, bytes):
        return "<bytes>"
    return os.fspath(source)


def within_limit(data: bytes, name: str, limit: int = MAX_IMAGE_BYTES) -> bytes:
    """``data`` itself; an ``ImageError`` if it is over ``limit`` bytes."""
    if len(data) > limit:
        raise ImageError(name, f"more than {limit // 2**20} MiB: not an image this tool reads")
    return data


def read_limited(stream: BinaryIO, name: str, limit: int = MAX_IMAGE_BYTES) -> bytes:
    """At most ``limit`` bytes of a stream; an ``ImageError`` if it holds more."""
    return within_limit(stream.read(limit + 1), name, limit)


def read_file(path: str, name: str, limit: int = MAX_IMAGE_BYTES) -> bytes:
    """A regular file's bytes; FIFOs, devices and sockets are refused without blocking on them."""
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; fstat then tells what was opened.
        handle = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise ImageError(name, "no such file") from None
    except IsADirectoryError:
        raise ImageError(name, "is a folder, not an image file") from None
    except PermissionError:
        raise ImageError(name, "permission denied") from None
    except OSError as exc:
        raise ImageError(name, f"cannot read ({exc.strerror or exc})") from None
    mode = os.fstat(handle).st_mode
    if not stat.S_ISREG(mode):
        os.close(handle)
        if stat.S_ISDIR(mode):
            raise ImageError(name, "is a folder, not an image file")
        raise ImageError(name, "not a regular file (a pipe, device or socket): save the image to a file")
    with os.fdopen(handle, "rb") as file:
        try:
            return read_limited(file, name, limit)
        except OSError as exc:
            raise ImageError(name, f"cannot read ({exc.strerror or exc})") from None


def _read_source(source: str | os.PathLike | bytes, name: str) -> bytes:
    if isinstance(source, bytes):
        return within_limit(source, name)
    text = os.fspath(source)
    if isinstance(text, str) and text.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(text, timeout=URL_TIMEOUT_S) as response:
                return read_limited(response, name)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ImageError(name, f"cannot download ({reason})") from None
    return read_file(os.fsdecode(text), name)


def _allow_pixels(max_pixels: int) -> None:
    """Let Pillow open images up to ``max_pixels``; our own check (below) is the one that refuses.

    Pillow refuses images over twice ``Image.MAX_IMAGE_PIXELS`` inside ``Image.open``, before any
    check of ours can run; a limit raised above Pillow's raises Pillow's (process-wide, only upwards).
    """
    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = max_pixels


def _decode(data: bytes, name: str, max_pixels: int) -> Image.Image:
    if not data:
        raise ImageError(name, "empty file")
    _allow_pixels(max_pixels)
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > max_pixels:
            raise ImageError(name, f"image too large ({width}x{height} px, limit {max_pixels} pixels)")
        if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
            raise ImageError(
                name,
                f"extreme aspect ratio ({width}x{height} px, over {MAX_ASPECT_RATIO}:1): "
                "resizing it for the model would take huge memory",
            )
        image.load()
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(name, "not an image file (unrecognised format)") from None
    except Image.DecompressionBombError:
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
    name = source_name(source)
    if isinstance(source, Image.Image):
        return to_rgb(source)
    image = _decode(_read_source(source, name), name, max_pixels)
    try:
        return to_rgb(image)
    except (OSError, ValueError) as exc:
        raise ImageError(name, f"cannot convert to RGB ({exc})") from None
