#!/usr/bin/env python
"""Measure ``safellava batch`` throughput against the floor: the model's own ``generate`` time.

    python scripts/bench_batch.py            # about five minutes on 2 CPU cores
    python scripts/bench_batch.py --backends --vllm-python .vllm-venv/bin/python   # + --ray and vLLM

A folder of JPEG photos-sized images (640x480) and a small random LLaVA-1.5 checkpoint (a 6-layer
ViT at 224 px, a 4-layer language model; large enough that generation, not decoding, dominates as
with real models) are written to a temporary folder. For batch sizes 1, 4 and 16 it reports:

- images/s of a batch run (discovery, background decoding and preprocessing, batched generate,
  writing JSON Lines), the model already loaded;
- the floor: the time the same model spends in ``generate`` on the same batches, preprocessed
  beforehand;
- their ratio (target at batch size 16: <= 1.15).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

VISION = dict(
    hidden_size=256,
    intermediate_size=1024,
    num_hidden_layers=6,
    num_attention_heads=4,
    image_size=224,
    patch_size=14,
)
TEXT = dict(
    hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8
)


def write_fixtures(folder: Path, images: int) -> tuple[Path, Path, Path]:
    """The random checkpoint, a fitting Safe-CLIP stand-in, and a folder of images."""
    import numpy as np
    from make_tiny_checkpoints import build_clip, build_llava, train_tokenizer
    from PIL import Image
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    tokenizer = train_tokenizer(folder / "tokenizer")
    llava = build_llava(folder / "llava", tokenizer, vision=VISION, text=TEXT, never_stop=True)
    tower = build_clip(folder / "safeclip", seed=1, **VISION)
    photos = folder / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for index in range(images):
        # Smooth gradients plus noise: decodes like a photo, not like pure noise.
        y, x = np.mgrid[0:480, 0:640]
        base = np.stack([x * 255 / 640, y * 255 / 480, (x + y) * 255 / 1120], axis=-1)
        pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(photos / f"{index:04d}.jpg", quality=90)
    return llava, tower, photos


def floor_seconds(loaded, photos: Path, batch_size: int, generation) -> float:
    """Seconds spent in ``generate`` alone on the same batches, preprocessed beforehand."""
    import safellava
    from safellava.batch import discover

    engine = loaded.engine
    prompt = engine.caption_prompt(generation)
    items = discover(photos)
    batches = []
    for start in range(0, len(items), batch_size):
        images = [safellava.load_image(item.path) for item in items[start : start + batch_size]]
        batches.append(engine.prepare(images, [prompt] * len(images)))
    started = time.perf_counter()
    for inputs in batches:
        engine.generate(inputs, generation)
    return time.perf_counter() - started


def batch_seconds(loaded, photos: Path, output: Path, batch_size: int, generation, workers: int) -> float:
    """Wall time of a whole batch run into a fresh JSON Lines file, the model already loaded."""
    from safellava.batch import BatchCaptioner, BatchOptions, open_writer, plan_folder

    output.unlink(missing_ok=True)
    started = time.perf_counter()
    options = BatchOptions(root=photos, format="jsonl", output=output, workers=workers)
    writer = open_writer(options)
    captioner = BatchCaptioner(loaded, options, generation, writer)
    progress = captioner.run(plan_folder(options, writer))
    seconds = time.perf_counter() - started
    assert progress.captioned == len(list(photos.glob("*.jpg"))), progress
    return seconds


def backend_run(
    python: str, photos: Path, llava: Path, tower: Path, output: Path, new_tokens: int, *flags: str
):
    """One ``safellava batch`` command: its wall time and the images/s of its summary line."""
    import os
    import re
    import subprocess

    output.unlink(missing_ok=True)
    command = [python, "-m", "safellava", "batch", str(photos), "--model", str(llava), "--vision-tower", str(tower),
               "--format", "jsonl", "-o", str(output), "--batch-size", "16", "--max-new-tokens", str(new_tokens),
               "--dtype", "float32", *flags]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    match = re.search(r"captioned (\d+).* in ([\d.]+)s \(([\d.]+) images/s\)", done.stderr)
    if done.returncode != 0 or not match:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    return wall, float(match.group(3))


def backends_table(
    photos: Path, llava: Path, tower: Path, folder: Path, new_tokens: int, vllm_python: str | None
):
    """images/s at batch size 16 with each way of running ``batch``, as whole commands."""
    rows = [
        ("transformers (default)", sys.executable, ()),
        ("--ray (local, 1 worker)", sys.executable, ("--ray",)),
    ]
    if vllm_python:
        rows.append(("--backend vllm", vllm_python, ("--backend", "vllm")))
    print("\n| backend | images/s while captioning | whole command, load included (s) |")
    print("|---|---|---|")
    for name, python, flags in rows:
        if "vllm" in name:  # the first run exports the model into the cache; the second reuses it
            backend_run(python, photos, llava, tower, folder / "warm.jsonl", new_tokens, *flags)
        wall, rate = backend_run(python, photos, llava, tower, folder / "backend.jsonl", new_tokens, *flags)
        print(f"| {name} | {rate:.2f} | {wall:.1f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64, help="images in the folder (default 64)")
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds per batch size (default 3)")
    parser.add_argument("--new-tokens", type=int, default=24, help="tokens per caption (default 24)")
    parser.add_argument("--workers", type=int, default=2, help="decoding threads (default 2)")
    parser.add_argument(
        "--backends",
        action="store_true",
        help="also compare the default backend, --ray and (with --vllm-python) vLLM",
    )
    parser.add_argument(
        "--vllm-python", help="interpreter of a venv with vLLM and safellava, for the vLLM column"
    )
    args = parser.parse_args()

    import safellava
    from safellava import logs

    logs.configure(verbose=False)
    folder = Path(tempfile.mkdtemp(prefix="safellava-bench-batch-"))
    try:
        print(f"writing {args.images} images and a checkpoint to {folder} ...", flush=True)
        llava, tower, photos = write_fixtures(folder, args.images)
        loaded = safellava.load(model=str(llava), vision_tower=str(tower), device="cpu")
        rows = []
        for batch_size in (1, 4, 16):
            generation = loaded.generation_options(max_new_tokens=args.new_tokens, batch_size=batch_size)
            floor_seconds(loaded, photos, batch_size, generation)  # warm-up
            runs, floors = [], []
            for _ in range(args.rounds):  # alternating, so that drift hits both alike
                runs.append(
                    batch_seconds(loaded, photos, folder / "out.jsonl", batch_size, generation, args.workers)
                )
                floors.append(floor_seconds(loaded, photos, batch_size, generation))
            rows.append((batch_size, runs, floors))
        if args.backends:
            backends_table(photos, llava, tower, folder, args.new_tokens, args.vllm_python)
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    print(
        f"\n{args.images} images of 640x480, {args.new_tokens} new tokens each, {args.workers} decoding workers"
    )
    print("| batch size | batch images/s | floor images/s | batch / floor time (median, min-max) |")
    print("|---|---|---|---|")
    for batch_size, runs, floors in rows:
        ratios = [run / floor for run, floor in zip(runs, floors, strict=True)]
        print(
            f"| {batch_size} | {args.images / statistics.median(runs):.2f} | "
            f"{args.images / statistics.median(floors):.2f} | "
            f"{statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f}) |"
        )
    print("\ntarget: batch / floor <= 1.15 at batch size 16")


if __name__ == "__main__":
    main()
