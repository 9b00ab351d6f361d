"""compare: the safe and the original tower's captions, each equal to its own caption run."""

from __future__ import annotations

import json

import pytest

import safellava
from safellava.cli import main
from safellava.compare import TowerComparer

from .conftest import MAX_NEW_TOKENS, load_tiny


def _open(images):
    return [str(p) for p in images], [safellava.load_image(p) for p in images]


@pytest.mark.parametrize(
    ("family", "quantize"), [("llava", "none"), ("llava_next", "none"), ("llava", "4bit")]
)
def test_compare_equals_the_two_caption_runs(tiny, images, family, quantize):
    safe = load_tiny(tiny, family, quantize=quantize)
    original = load_tiny(tiny, family, tower="original", quantize=quantize)
    names, opened = _open(images)
    results = TowerComparer(safe).compare(names, opened, safe.generation)
    assert [r.safe for r in results] == safe.caption(names)
    assert [r.original for r in results] == original.caption(names)
    assert [r.safe for r in results] != [r.original for r in results]
    assert [r.safe for r in results] == safe.caption(names)  # the safe tower is back in place


def test_compare_cli_json_and_refusal(tiny, images, capsys):
    flags = ["--model", str(tiny.llava), "--vision-tower", str(tiny.safeclip), "--device", "cpu"]
    code = main(["compare", str(images[0]), *flags, "--json", "--max-new-tokens", str(MAX_NEW_TOKENS)])
    record = json.loads(capsys.readouterr().out)
    assert code == 0
    assert set(record) >= {"image", "prompt", "safe", "original", "model", "vision_tower", "original_tower"}
    assert record["safe"] != record["original"]
    code = main(["compare", str(images[0]), "--model", str(tiny.llava), "--vision-tower", "original"])
    assert code == 2
    assert "give a safe --vision-tower" in capsys.readouterr().err
