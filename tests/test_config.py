"""Presets: one per row of the model table, YAML files by path, flags overriding them."""

from __future__ import annotations

import pytest

from safellava.config import (
    DEFAULT_PRESET,
    SAFE_CLIP_336,
    GenerationOptions,
    ModelOptions,
    available_presets,
    load_preset,
    override,
)
from safellava.errors import UsageError

MODEL_TABLE = {
    "llava-1.5-7b": ("llava-hf/llava-1.5-7b-hf", "llava_v1"),
    "llava-1.5-13b": ("llava-hf/llava-1.5-13b-hf", "llava_v1"),
    "llava-1.6-mistral-7b": ("llava-hf/llava-v1.6-mistral-7b-hf", "mistral_instruct"),
    "llava-1.6-vicuna-7b": ("llava-hf/llava-v1.6-vicuna-7b-hf", "llava_v1"),
    "llava-1.6-vicuna-13b": ("llava-hf/llava-v1.6-vicuna-13b-hf", "llava_v1"),
    "llava-1.6-34b": ("llava-hf/llava-v1.6-34b-hf", "chatml_direct"),
}


PAPER_PRESETS = ("paper", "paper-llava-1.5-13b")  # tested in test_original.py


def test_every_model_table_row_has_a_preset():
    assert sorted(available_presets()) == sorted([*MODEL_TABLE, *PAPER_PRESETS])


@pytest.mark.parametrize("name", sorted(MODEL_TABLE))
def test_preset_contents(name):
    preset = load_preset(name)
    assert preset.name == name
    assert (preset.model.model, preset.model.prompt_format) == MODEL_TABLE[name]
    assert preset.model.vision_tower == SAFE_CLIP_336
    assert preset.generation.temperature == 0.0
    assert preset.description


def test_default_preset_is_llava_15_7b():
    assert DEFAULT_PRESET == "llava-1.5-7b"
    assert load_preset().model.model == "llava-hf/llava-1.5-7b-hf"


def test_preset_from_yaml_path(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(
        "model: /models/llava\nvision_tower: /models/safeclip\nquantize: 4bit\n"
        "generation:\n  max_new_tokens: 20\n  prompt: Describe it.\n"
    )
    preset = load_preset(str(path))
    assert preset.name == "mine"
    assert preset.model.model == "/models/llava"
    assert preset.model.quantize == "4bit"
    assert preset.generation.max_new_tokens == 20
    assert preset.generation.prompt == "Describe it."
    assert preset.generation.top_p == 1.0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("model: x\ncolour: red\n", "unknown keys colour"),
        ("generation:\n  beams: 3\n", "unknown keys beams"),
        ("quantize: 3bit\n", "unknown quantize '3bit'"),
        ("generation:\n  temperature: -1\n", "temperature must be 0"),
        ("- a\n- b\n", "must be a YAML mapping"),
        ("model: [unclosed\n", "preset"),
    ],
)
def test_bad_preset_files_are_usage_errors(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(UsageError, match=message):
        load_preset(str(path))


def test_unknown_preset_name_lists_the_known_ones():
    with pytest.raises(UsageError, match=r"unknown preset 'llava-9'.*llava-1.5-7b"):
        load_preset("llava-9")


def test_missing_preset_file():
    with pytest.raises(UsageError, match="does not exist"):
        load_preset("/nowhere/preset.yaml")


def test_override_skips_none_and_validates():
    base = ModelOptions()
    changed = override(base, quantize="8bit", device=None)
    assert changed.quantize == "8bit"
    assert changed.device == base.device
    with pytest.raises(UsageError, match="unknown device 'tpu'"):
        override(base, device="tpu")
    assert override(base, device="cuda:1").device == "cuda:1"
    with pytest.raises(UsageError, match="batch_size must be at least 1"):
        override(GenerationOptions(), batch_size=0)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("model: [1]\n", "model must be text, got \\[1\\]"),
        ("device: 5\n", "device must be text, got 5"),
        ("generation:\n  max_new_tokens: many\n", "max_new_tokens must be a whole number"),
        ("generation:\n  temperature: true\n", "temperature must be a number"),
        ("revision: null\ngeneration:\n  seed: 3\n  temperature: 1\n", None),
    ],
)
def test_preset_values_of_the_wrong_type(tmp_path, text, message):
    path = tmp_path / "p.yaml"
    path.write_text(text)
    if message is None:
        preset = load_preset(str(path))
        assert (preset.generation.seed, preset.generation.temperature) == (3, 1)
        return
    with pytest.raises(UsageError, match=message):
        load_preset(str(path))


def test_unknown_library_options_are_usage_errors(safe_llava, images):
    with pytest.raises(UsageError, match="unknown option bogus"):
        safe_llava.caption(str(images[0]), bogus=1)


def test_yaml_aliases_are_refused_before_they_expand(tmp_path):
    levels = ["&a0 [x, x, x, x, x, x, x, x, x]"] + [
        f"&a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)
    ]
    path = tmp_path / "bomb.yaml"
    path.write_text(f"model: [{', '.join(levels)}]\n")
    with pytest.raises(UsageError) as caught:
        load_preset(str(path))
    assert "YAML aliases (*a0) are not allowed in presets" in str(caught.value)
    assert len(str(caught.value)) < 300


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"\xff\xfe\x00\x01binary", "is not UTF-8 text"), (b"# " + b"x" * 70_000 + b"\n", "is over 64 KiB")],
)
def test_a_preset_that_is_not_a_preset_file(tmp_path, content, message):
    path = tmp_path / "odd.yaml"
    path.write_bytes(content)
    with pytest.raises(UsageError, match=message):
        load_preset(str(path))


@pytest.mark.parametrize("value", [".nan", ".inf", "-1"])
def test_temperature_must_be_a_finite_number(tmp_path, value):
    path = tmp_path / "p.yaml"
    path.write_text(f"generation:\n  temperature: {value}\n")
    with pytest.raises(UsageError, match="temperature must be 0"):
        load_preset(str(path))
