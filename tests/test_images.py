"""Images: any mode to upright RGB, and one clear reason for every file that cannot be read."""

from __future__ import annotations

import functools
import http.server
import io
import threading

import numpy as np
import pytest
from PIL import Image

from safellava.errors import ImageError
from safellava.images import load_image


def _save(image: Image.Image, path, **kwargs):
    image.save(path, **kwargs)
    return path


def test_rgba_transparency_goes_onto_white(tmp_path):
    image = Image.new("RGBA", (4, 4), (255, 0, 0, 255))
    image.putpixel((0, 0), (0, 0, 0, 0))
    rgb = load_image(_save(image, tmp_path / "a.png"))
    assert rgb.mode == "RGB"
    assert rgb.getpixel((0, 0)) == (255, 255, 255)
    assert rgb.getpixel((1, 1)) == (255, 0, 0)


def test_palette_with_transparency(tmp_path):
    image = Image.new("P", (4, 4), 1)
    image.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    image.putpixel((0, 0), 0)
    image.info["transparency"] = 0
    rgb = load_image(_save(image, tmp_path / "p.png", transparency=0))
    assert rgb.getpixel((0, 0)) == (255, 255, 255)
    assert rgb.getpixel((2, 2)) == (0, 0, 255)


@pytest.mark.parametrize(
    ("mode", "color", "suffix"),
    [("L", 128, "png"), ("LA", (128, 255), "png"), ("1", 1, "png"), ("CMYK", (0, 255, 255, 0), "jpg")],
)
def test_modes_become_rgb(tmp_path, mode, color, suffix):
    rgb = load_image(_save(Image.new(mode, (8, 8), color), tmp_path / f"x.{suffix}"))
    assert rgb.mode == "RGB"
    assert rgb.size == (8, 8)


def test_cmyk_red_stays_red(tmp_path):
    rgb = load_image(_save(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), tmp_path / "c.tiff"))
    assert rgb.getpixel((4, 4)) == (255, 0, 0)


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path):
    values = np.full((4, 4), 32768, dtype=np.uint16)
    values[0, 0] = 65535
    image = Image.fromarray(values)
    assert image.mode.startswith("I;16")
    rgb = load_image(_save(image, tmp_path / "deep.png"))
    assert rgb.mode == "RGB"
    assert rgb.getpixel((0, 0)) == (255, 255, 255)
    assert rgb.getpixel((1, 1))[0] == 128


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), (0, 128, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when shown
    rgb = load_image(_save(image, tmp_path / "rotated.jpg", exif=exif))
    assert rgb.size == (20, 40)


def test_bytes_and_pil_inputs(tmp_path):
    buffer = io.BytesIO()
    Image.new("RGB", (5, 6), (1, 2, 3)).save(buffer, format="PNG")
    assert load_image(buffer.getvalue()).size == (5, 6)
    assert load_image(Image.new("LA", (3, 3))).mode == "RGB"


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda p: p, "no such file"),
        (lambda p: (p.mkdir(), p)[1], "is a folder"),
        (lambda p: (p.write_bytes(b""), p)[1], "empty file"),
        (lambda p: (p.write_text("hello, not a picture"), p)[1], "not an image file"),
    ],
    ids=["missing", "folder", "empty", "text-named-jpg"],
)
def test_unreadable_sources_have_one_line_reasons(tmp_path, make, reason):
    source = make(tmp_path / "photo.jpg")
    with pytest.raises(ImageError) as caught:
        load_image(source)
    assert reason in caught.value.reason
    assert str(caught.value).startswith(str(source))
    assert "\n" not in str(caught.value)


def test_truncated_jpeg_is_refused(tmp_path):
    rng = np.random.default_rng(0)
    full = tmp_path / "full.jpg"
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(full, quality=95)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(ImageError, match="corrupt or truncated"):
        load_image(cut)


def test_pixel_limit_refuses_decompression_bombs(tmp_path):
    path = _save(Image.new("RGB", (200, 100)), tmp_path / "big.png")
    with pytest.raises(ImageError, match=r"too large \(200x100 px"):
        load_image(path, max_pixels=10_000)
    assert load_image(path, max_pixels=20_000).size == (200, 100)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def http_folder(tmp_path):
    handler = functools.partial(_QuietHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield tmp_path, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_url_images(http_folder):
    folder, base = http_folder
    _save(Image.new("RGB", (7, 9), (9, 9, 9)), folder / "web.png")
    assert load_image(f"{base}/web.png").size == (7, 9)
    with pytest.raises(ImageError, match="cannot download"):
        load_image(f"{base}/absent.png")


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_max_pixels_can_be_raised_above_pillows_own_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    path = tmp_path / "big.png"
    Image.new("1", (60, 60)).save(path)  # 3600 pixels: over twice Pillow's limit
    with pytest.raises(ImageError, match="too large"):
        load_image(path, max_pixels=2000)
    assert load_image(path, max_pixels=5000).size == (60, 60)


def test_extreme_aspect_ratios_are_refused(tmp_path):
    path = tmp_path / "thin.png"
    Image.new("RGB", (2, 400)).save(path)
    with pytest.raises(ImageError, match=r"extreme aspect ratio \(2x400 px, over 50:1\)"):
        load_image(path)
    Image.new("RGB", (10, 400)).save(path)
    assert load_image(path).size == (10, 400)
