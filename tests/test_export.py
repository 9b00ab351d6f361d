"""export: the merged model in the llava-hf layout, loadable by plain transformers and engines."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch
from transformers import (
    AutoProcessor,
    CLIPVisionModel,
    LlavaForConditionalGeneration,
    LlavaNextForConditionalGeneration,
)

from safellava import export as export_module
from safellava.cli import main
from safellava.errors import UsageError
from safellava.export import export
from safellava.writers import ordinary_mode

from .conftest import MAX_NEW_TOKENS, load_tiny

CLASSES = {"llava": LlavaForConditionalGeneration, "llava_next": LlavaNextForConditionalGeneration}


def _flags(tiny, tower=None):
    return ["--model", str(tiny.llava), "--vision-tower", str(tower or tiny.safeclip), "--device", "cpu"]


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_export_round_trip_with_plain_transformers(tiny, images, tmp_path, family, capsys):
    safe = load_tiny(tiny, family)
    target = export(safe, tmp_path / "merged", dtype="float32")
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
        export(load_tiny(tiny, quantize="8bit"), tmp_path / "q8")


def test_interrupted_export_leaves_nothing(tiny, tmp_path, monkeypatch):
    safe = load_tiny(tiny)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(export_module, "model_card", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export(safe, tmp_path / "merged")
    assert list(tmp_path.iterdir()) == []


def test_export_never_replaces_a_folder_holding_its_sources_or_the_cwd(tiny, tmp_path, monkeypatch, capsys):
    assert main(["export", str(tiny.llava.parent), *_flags(tiny), "--force"]) == 2
    assert "which --force would delete" in capsys.readouterr().err
    assert (tiny.llava / "config.json").exists()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.txt").write_text("keep")
    assert main(["export", ".", *_flags(tiny), "--force"]) == 2
    assert "the current folder" in capsys.readouterr().err
    assert (tmp_path / "mine.txt").read_text() == "keep"


def test_exports_get_ordinary_permissions(tiny, tmp_path):
    out = export(load_tiny(tiny), tmp_path / "merged")
    assert stat.S_IMODE(out.stat().st_mode) == ordinary_mode(directory=True)
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {ordinary_mode()}
    assert os.access(out / "model.safetensors", os.R_OK)
