"""compare, export and info on the tiny checkpoints, both families."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import (
    AutoProcessor,
    CLIPVisionModel,
    LlavaForConditionalGeneration,
    LlavaNextForConditionalGeneration,
)

import safellava
from safellava import export as export_module
from safellava.cli import main
from safellava.compare import TowerComparer
from safellava.config import resolve_options
from safellava.errors import UsageError
from safellava.export import export
from safellava.info import describe

from .conftest import MAX_NEW_TOKENS

CLASSES = {"llava": LlavaForConditionalGeneration, "llava_next": LlavaNextForConditionalGeneration}


def _load(tiny, family="llava", tower=None, **kwargs):
    return safellava.load(
        model=str(getattr(tiny, family)),
        vision_tower=str(tower or tiny.safeclip),
        device="cpu",
        max_new_tokens=MAX_NEW_TOKENS,
        **kwargs,
    )


def _open(images):
    return [str(p) for p in images], [safellava.load_image(p) for p in images]


@pytest.mark.parametrize(
    ("family", "quantize"), [("llava", "none"), ("llava_next", "none"), ("llava", "4bit")]
)
def test_compare_equals_the_two_caption_runs(tiny, images, family, quantize):
    safe = _load(tiny, family, quantize=quantize)
    original = _load(tiny, family, tower="original", quantize=quantize)
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


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_export_round_trip_with_plain_transformers(tiny, images, tmp_path, family, capsys):
    safe = _load(tiny, family)
    target = export(safe, tmp_path / "merged")
    model = CLASSES[family].from_pretrained(target)
    processor = AutoProcessor.from_pretrained(target)
    assert processor.chat_template == safe.processor.chat_template
    expected = CLIPVisionModel.from_pretrained(tiny.safeclip).state_dict()
    for key, tensor in model.model.vision_tower.state_dict().items():
        assert torch.equal(tensor, expected[key]), key
    flags = ["--model", str(target), "--vision-tower", "original", "--device", "cpu"]
    code = main(["caption", *map(str, images), *flags, "--max-new-tokens", str(MAX_NEW_TOKENS), "--json"])
    merged = [json.loads(line)["caption"] for line in capsys.readouterr().out.splitlines()]
    assert code == 0
    assert merged == safe.caption([str(p) for p in images])
    card = (target / "README.md").read_text()
    assert "CC BY-NC 4.0" in card and "2311.16254" in card and str(tiny.safeclip) in card
    provenance = json.loads((target / "safellava.json").read_text())
    assert provenance["model"] == str(getattr(tiny, family))
    assert provenance["vision_tower"] == str(tiny.safeclip)
    assert provenance["tower_fingerprint"].startswith("sha256:")


def test_export_cli_is_half_precision_and_matches_info_fingerprint(tiny, tmp_path, capsys):
    target = tmp_path / "half"
    flags = ["--model", str(tiny.llava), "--vision-tower", str(tiny.safeclip), "--device", "cpu"]
    assert main(["export", str(target), *flags]) == 0
    from safetensors import safe_open

    with safe_open(target / "model.safetensors", "pt") as weights:
        assert {weights.get_slice(k).get_dtype() for k in weights.keys()} == {"F16"}  # noqa: SIM118
    assert main(["info", *flags, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (
        json.loads((target / "safellava.json").read_text())["tower_fingerprint"]
        == report["vision_tower"]["fingerprint"]
    )


def test_export_refusals(tiny, tmp_path, capsys):
    flags = ["--model", str(tiny.llava), "--vision-tower", str(tiny.safeclip), "--device", "cpu"]
    assert main(["export", str(tmp_path / "q"), *flags, "--quantize", "4bit"]) == 2
    assert "cannot export a 4bit-quantized model" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    assert main(["export", str(busy), *flags]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert (busy / "keep.txt").read_text() == "mine"
    assert main(["export", str(busy), *flags, "--force"]) == 0
    assert not (busy / "keep.txt").exists() and (busy / "model.safetensors").exists()
    with pytest.raises(UsageError, match="quantized"):
        export(_load(tiny, quantize="8bit"), tmp_path / "q8")


def test_interrupted_export_leaves_nothing(tiny, tmp_path, monkeypatch):
    safe = _load(tiny)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(export_module, "model_card", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export(safe, tmp_path / "merged")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_info_reads_configs_only(tiny, family, monkeypatch):
    def no_weights(*args, **kwargs):
        raise AssertionError("info loaded a model without --load")

    monkeypatch.setattr("safellava.loader._from_pretrained", no_weights)
    options, _, preset = resolve_options(model=str(getattr(tiny, family)), vision_tower=str(tiny.safeclip))
    report = describe(options, preset)
    assert preset is None
    assert report["model"]["family"] == family
    assert report["model"]["prompt_format"] == ("llava" if family == "llava" else "mistral")
    assert report["model"]["chat_template"] is True
    assert report["vision_tower"]["fits"] is True
    assert report["vision_tower"]["fingerprint"].startswith("sha256:")
    params = report["parameters"]
    monkeypatch.undo()
    safe = _load(tiny, family)
    inner = safe.model.model
    assert params["vision_tower"] == sum(p.numel() for p in inner.vision_tower.parameters())
    assert params["total"] == sum(p.numel() for p in safe.model.parameters())
    memory = report["weight_memory_bytes"]
    assert memory["none"] == 2 * params["total"] > memory["8bit"] > memory["4bit"]
    assert report["versions"]["transformers"] == __import__("transformers").__version__
    assert report["devices"][0] == {"type": "cpu"}


def test_info_incompatible_tower_and_load(tiny, capsys):
    flags = ["--model", str(tiny.llava), "--device", "cpu"]
    assert main(["info", *flags, "--vision-tower", str(tiny.clip_large_images)]) == 0
    text = capsys.readouterr().out
    assert "DOES NOT FIT: image size 64 where the LLaVA needs 32" in text
    assert (
        main(["info", *flags, "--vision-tower", str(tiny.safeclip), "--load", "--quantize", "4bit", "--json"])
        == 0
    )
    loaded = json.loads(capsys.readouterr().out)["loaded"]
    assert loaded["quantize"] == "4bit"
    assert 0 < loaded["memory_footprint_bytes"] < json.loads(json.dumps(loaded))["memory_footprint_bytes"] + 1
