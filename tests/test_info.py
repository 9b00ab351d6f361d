"""info: what a setup resolves to, from configs alone, and the real footprint with --load."""

from __future__ import annotations

import json

import pytest

from safellava.cli import main
from safellava.config import resolve_options
from safellava.info import setup_report

from .conftest import load_tiny


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_info_reads_configs_only(tiny, family, monkeypatch):
    def no_weights(*args, **kwargs):
        raise AssertionError("info loaded a model without --load")

    monkeypatch.setattr("safellava.loader._from_pretrained", no_weights)
    options, _, preset = resolve_options(model=str(getattr(tiny, family)), vision_tower=str(tiny.safeclip))
    report = setup_report(options, preset)
    assert preset is None
    assert report["model"]["family"] == family
    assert report["model"]["prompt_format"] == ("llava_v1" if family == "llava" else "mistral_instruct")
    assert report["model"]["pads_images"] is (family == "llava")
    assert report["model"]["chat_template"] is True
    assert report["vision_tower"]["fits"] is True
    assert report["vision_tower"]["fingerprint"].startswith("sha256:")
    params = report["parameters"]
    monkeypatch.undo()
    safe = load_tiny(tiny, family)
    inner = safe.model.model
    assert params["vision_tower"] == sum(p.numel() for p in inner.vision_tower.parameters())
    assert params["total"] == sum(p.numel() for p in safe.model.parameters())
    memory = report["weight_memory_bytes"]
    assert memory["none"] == 2 * params["total"] > memory["8bit"] > memory["4bit"]
    assert report["versions"]["transformers"] == __import__("transformers").__version__
    assert report["devices"][0] == {"type": "cpu"}


def test_info_incompatible_tower_and_load(tiny, capsys):
    flags = ["--model", str(tiny.llava), "--device", "cpu"]
    assert (
        main(["info", *flags, "--vision-tower", str(tiny.clip_large_images)]) == 2
    )  # a script can check fit
    text = capsys.readouterr().out
    assert "DOES NOT FIT: image size 96 where the LLaVA needs 64" in text
    assert (
        main(["info", *flags, "--vision-tower", str(tiny.safeclip), "--load", "--quantize", "4bit", "--json"])
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["loaded"]["quantize"] == "4bit"
    estimate = report["weight_memory_bytes"]["4bit"]  # from the configs alone
    assert abs(report["loaded"]["memory_footprint_bytes"] - estimate) < 0.05 * estimate


@pytest.mark.parametrize("tower", ["clip_wide", "safeclip"])
def test_info_counts_the_tower_that_was_named(tiny, tower, capsys):
    from transformers import CLIPVisionModel

    path = getattr(tiny, tower)
    code = main(["info", "--model", str(tiny.llava), "--vision-tower", str(path), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == (0 if tower == "safeclip" else 2)
    expected = sum(p.numel() for p in CLIPVisionModel.from_pretrained(path).parameters())
    assert report["parameters"]["vision_tower"] == expected
    rest = report["parameters"]["projector"] + report["parameters"]["language_model"]
    assert report["parameters"]["total"] == expected + rest


def test_info_load_with_a_preset_file(tiny, tmp_path, capsys):
    preset = tmp_path / "mine.yaml"
    preset.write_text(f"model: {tiny.llava}\nvision_tower: {tiny.safeclip}\ndevice: cpu\n")
    assert main(["info", "--preset", str(preset), "--load", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["preset"] == "mine" and report["loaded"]["memory_footprint_bytes"] > 0
