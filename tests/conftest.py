"""Shared fixtures: tiny checkpoints built once per session, offline, and test images."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

# Before transformers is imported anywhere: never reach the Hugging Face hub from a test.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# safellava's own cache (tower fingerprints) goes to a folder of this test run, not the user's.
os.environ["SAFELLAVA_CACHE"] = tempfile.mkdtemp(prefix="safellava-test-cache-")

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import make_tiny_checkpoints  # noqa: E402

MAX_NEW_TOKENS = 8


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> make_tiny_checkpoints.TinyCheckpoints:
    """Every tiny checkpoint, built once for the whole session."""
    return make_tiny_checkpoints.build_all(tmp_path_factory.mktemp("tiny"))


def _noise_image(path: Path, seed: int, size: tuple[int, int] = (64, 48)) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three different small RGB images, one of them tall (exercises LLaVA-NeXT tiling)."""
    folder = tmp_path_factory.mktemp("images")
    return [
        _noise_image(folder / "one.png", 0),
        _noise_image(folder / "two.jpg", 1),
        _noise_image(folder / "tall.png", 2, size=(24, 96)),
    ]


def load_tiny(tiny, family="llava", tower=None, **kwargs):
    """A tiny checkpoint loaded on the CPU with the Safe-CLIP stand-in (or ``tower``: a folder or "original")."""
    import safellava

    return safellava.load(
        model=str(getattr(tiny, family)),
        vision_tower=str(tower or tiny.safeclip),
        device="cpu",
        max_new_tokens=MAX_NEW_TOKENS,
        **kwargs,
    )


@pytest.fixture(scope="session")
def safe_llava(tiny):
    """Tiny LLaVA-1.5 with the Safe-CLIP stand-in tower, float32 on the CPU."""
    return load_tiny(tiny)


@pytest.fixture(scope="session")
def original_llava(tiny):
    """Tiny LLaVA-1.5 with its own (stock) tower."""
    return load_tiny(tiny, tower="original")


@pytest.fixture(scope="session")
def safe_next(tiny):
    """Tiny LLaVA-NeXT with the Safe-CLIP stand-in tower."""
    return load_tiny(tiny, "llava_next")


@pytest.fixture(scope="session")
def safe_original(tiny):
    """Tiny original-format LLaVA-1.5 (mlp2x_gelu, padded images) with the Safe-CLIP stand-in."""
    return load_tiny(tiny, "original_v15")


@pytest.fixture(scope="session")
def safe_lightning(tiny):
    """Tiny original-format lightning LLaVA (linear projector, 32 px) with the 224-px Safe-CLIP stand-in."""
    return load_tiny(tiny, "original_lightning", tiny.safeclip_224)


def image_steers_the_answer(loaded, images, prompt) -> bool:
    """Whether the next-token logits after ``prompt`` differ between ``images`` (the image is used).

    Stronger than comparing a few greedy tokens of random tiny models, which can coincide.
    """
    import torch

    with torch.no_grad():
        logits = [
            loaded.model(**loaded.processor(images=[image], text=[prompt], return_tensors="pt")).logits[0, -1]
            for image in images
        ]
    return any(not torch.allclose(logits[0], other, atol=1e-4) for other in logits[1:])
