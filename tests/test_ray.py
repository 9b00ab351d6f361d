"""``batch --ray`` on a local Ray (2 CPUs, no dashboard): the same records as the plain batch."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
from PIL import Image

from safellava.cli import main

from .conftest import MAX_NEW_TOKENS

ray = pytest.importorskip("ray", reason="needs the ray extra")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()


@pytest.fixture
def hostile_folder(tmp_path):
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(5)
    for name, size in [
        ("a.png", (64, 48)),
        ("b.jpg", (40, 90)),
        ("sub/c.png", (80, 80)),
        ("d.webp", (50, 50)),
    ]:
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(folder / name)
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.jpg").write_text("not a picture")
    (folder / "sub" / "random.png").write_bytes(os.urandom(200))
    return folder


def _flags(tiny):
    return ["--model", str(tiny.llava), "--vision-tower", str(tiny.safeclip), "--device", "cpu",
            "--max-new-tokens", str(MAX_NEW_TOKENS), "-r", "--format", "jsonl", "--batch-size", "2"]  # fmt: skip


def _records(path):
    return sorted((json.loads(line) for line in path.read_text().splitlines()), key=lambda r: r["image"])


def test_ray_gives_the_plain_batch_records_and_resumes(local_ray, tiny, hostile_folder, tmp_path, capsys):
    plain, on_ray = tmp_path / "plain.jsonl", tmp_path / "ray.jsonl"
    assert main(["batch", str(hostile_folder), *_flags(tiny), "-o", str(plain)]) == 1
    capsys.readouterr()
    assert (
        main(["batch", str(hostile_folder), *_flags(tiny), "-o", str(on_ray), "--ray", "--num-workers", "1"])
        == 1
    )
    err = capsys.readouterr().err
    assert "captioned 4, skipped 0 already captioned, failed 3" in err
    assert _records(on_ray) == _records(plain)
    errors = {r["image"]: r["error"] for r in _records(tmp_path / "ray.errors.jsonl")}
    assert errors == {r["image"]: r["error"] for r in _records(tmp_path / "plain.errors.jsonl")}
    assert set(errors) == {"empty.png", "notes.jpg", "sub/random.png"}
    # A rerun skips what is done and retries only the failures.
    assert main(["batch", str(hostile_folder), *_flags(tiny), "-o", str(on_ray), "--ray"]) == 1
    assert "captioned 0, skipped 4 already captioned, failed 3" in capsys.readouterr().err
    assert len(on_ray.read_text().splitlines()) == 4


def test_ray_and_vllm_missing_are_one_line_each(tiny, hostile_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray.data", None)
    assert main(["batch", str(hostile_folder), *_flags(tiny), "-o", str(tmp_path / "x.jsonl"), "--ray"]) == 2
    assert (
        capsys.readouterr().err.strip()
        == "safellava: error: --ray needs Ray Data: pip install 'safellava[ray]'"
    )
    monkeypatch.setitem(sys.modules, "vllm", None)
    for command in (["batch", str(hostile_folder), *_flags(tiny), "-o", str(tmp_path / "y.jsonl")],
                    ["caption", str(hostile_folder / "a.png"), "--model", str(tiny.llava)]):  # fmt: skip
        assert main([*command, "--backend", "vllm"]) == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and "--backend vllm needs vLLM: pip install vllm" in err
