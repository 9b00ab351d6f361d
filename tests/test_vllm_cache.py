"""The vLLM backend's export cache: keyed by what the checkpoints hold, never a stale or foreign export."""

from __future__ import annotations

import json
import shutil

from safellava.config import ModelOptions
from safellava.vllm_backend import _current, export_folder


def test_the_cache_key_follows_the_real_folders(tiny, tmp_path, monkeypatch):
    here, there = tmp_path / "a", tmp_path / "b"
    for root in (here, there):
        root.mkdir()
        shutil.copytree(tiny.llava, root / "llava")
    monkeypatch.chdir(here)
    first = export_folder(ModelOptions(model="./llava", vision_tower=str(tiny.safeclip)), "float16")
    monkeypatch.chdir(there)
    second = export_folder(ModelOptions(model="./llava", vision_tower=str(tiny.safeclip)), "float16")
    assert first != second  # the same words, other weights
    options = ModelOptions(model=str(here / "llava"), vision_tower=str(tiny.safeclip))
    assert export_folder(options, "float16") == first
    assert export_folder(options, "bfloat16") != first
    assert (
        export_folder(
            ModelOptions(model=str(here / "llava"), vision_tower=str(tiny.safeclip), pad_images=False),
            "float16",
        )
        != first
    )


def test_an_export_of_another_tower_is_not_reused(tiny, tmp_path, safe_llava):
    options = ModelOptions(model=str(tiny.llava), vision_tower=str(tiny.safeclip))
    folder = tmp_path / "export"
    folder.mkdir()
    assert not _current(folder, options)  # nothing there
    (folder / "safellava.json").write_text(json.dumps({"tower_fingerprint": "sha256:other"}))
    assert not _current(folder, options)
    (folder / "safellava.json").write_text(json.dumps({"tower_fingerprint": safe_llava.tower_fingerprint}))
    assert _current(folder, options)
