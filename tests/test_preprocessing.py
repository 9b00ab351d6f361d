"""Images as the original LLaVA preprocesses them: LLaVA-1.5 padded to a square, NeXT's anyres tiles."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor

import safellava
from safellava.export import export

from .conftest import load_tiny


def expand2square(pil_img, background_color):
    """The original LLaVA's ``llava/mm_utils.py`` function, as written there."""
    width, height = pil_img.size
    if width == height:
        return pil_img
    elif width > height:
        result = Image.new(pil_img.mode, (width, width), background_color)
        result.paste(pil_img, (0, (width - height) // 2))
        return result
    else:
        result = Image.new(pil_img.mode, (height, height), background_color)
        result.paste(pil_img, ((height - width) // 2, 0))
        return result


def _image(width, height, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8))


def _original_pixels(stock_processor, image):
    """What the original feeds the tower: expand2square with the mean colour, then the CLIP processor."""
    processor = stock_processor.image_processor
    padded = expand2square(image, tuple(int(x * 255) for x in processor.image_mean))
    return processor(images=[padded], return_tensors="pt")["pixel_values"]


@pytest.mark.parametrize("size", [(64, 32), (32, 64), (64, 33), (37, 91), (32, 32)])
def test_llava_15_pads_exactly_as_the_original(safe_llava, tiny, size):
    stock = AutoProcessor.from_pretrained(tiny.llava, backend="pil")
    image = _image(*size)
    ours = safe_llava.engine.prepare([image], ["<image>"])["pixel_values"]
    assert torch.equal(ours, _original_pixels(stock, image))


def test_a_wide_image_reaches_the_tower_whole(safe_llava, tiny):
    # 2:1, left and right quarters black, the middle white: a centre crop sees only white.
    pixels = np.full((64, 128, 3), 255, dtype=np.uint8)
    pixels[:, :32] = pixels[:, 96:] = 0
    image = Image.fromarray(pixels)
    ours = safe_llava.engine.prepare([image], ["<image>"])["pixel_values"][0]
    cropped = AutoProcessor.from_pretrained(tiny.llava, backend="pil").image_processor(
        images=[image], return_tensors="pt"
    )
    assert cropped["pixel_values"][0].min() > 1.5  # llava-hf's crop: all white, the black quarters cut away
    middle_row = ours[0, ours.shape[1] // 2]
    assert middle_row[0] < 0 < middle_row[middle_row.shape[0] // 2]  # padded: black edges, white middle


def test_every_path_pads_and_no_pad_crops(tiny, images, safe_llava):
    wide = _image(96, 40, seed=5)
    padded = expand2square(wide, tuple(int(x * 255) for x in safe_llava.processor.image_processor.image_mean))
    assert safe_llava.caption(wide) == safe_llava.caption(padded)
    cropping = load_tiny(tiny, pad_images=False)
    assert cropping.processor.image_processor.to_dict().get("do_pad") in (None, False)
    stock = AutoProcessor.from_pretrained(tiny.llava, backend="pil").image_processor
    expected = stock(images=[wide], return_tensors="pt")["pixel_values"]
    assert torch.equal(cropping.engine.prepare([wide], ["<image>"])["pixel_values"], expected)


@pytest.mark.parametrize("size", [(64, 32), (40, 90), (96, 96)])
def test_llava_next_tiles_are_the_checkpoint_processors(safe_next, tiny, size):
    image = _image(*size)
    stock = AutoProcessor.from_pretrained(tiny.llava_next, backend="pil")
    ours = safe_next.engine.prepare([image], ["<image>"])
    expected = stock(images=[image], text=["<image>"], return_tensors="pt")
    assert torch.equal(ours["pixel_values"], expected["pixel_values"])
    assert ours["image_sizes"].tolist() == expected["image_sizes"].tolist()


def test_the_exported_processor_pads_too(tiny, tmp_path, safe_llava):
    target = export(load_tiny(tiny), tmp_path / "merged")
    assert json.loads((target / "preprocessor_config.json").read_text())["do_pad"] is True
    exported = AutoProcessor.from_pretrained(target)
    image = _image(64, 32)
    stock = AutoProcessor.from_pretrained(tiny.llava, backend="pil")
    assert torch.equal(
        exported.image_processor(images=[image], return_tensors="pt")["pixel_values"],
        _original_pixels(stock, image),
    )
    reloaded = safellava.load(model=str(target), vision_tower="original", device="cpu", dtype="float16")
    assert torch.equal(
        reloaded.engine.prepare([image], ["<image>"])["pixel_values"].float(), _original_pixels(stock, image)
    )
