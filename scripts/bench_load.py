#!/usr/bin/env python
"""Measure start-up, load + first caption, and generation speed against plain transformers.

    python scripts/bench_load.py            # about three minutes on 2 CPU cores

1. Start-up: wall time of ``safellava --help`` next to ``python -c "import torch, transformers"``.
2. Load and first caption: a random LLaVA-1.5-shaped checkpoint (the full 24-layer ViT-L/14-336
   tower, the projector, a narrowed language model) and a full Safe-CLIP-shaped ``CLIPModel``
   (vision and text halves) are written to a temporary folder. Each in a fresh process, alternating,
   after a warm-up round, it times from before loading to after a one-token caption of one image:
   (a) plain ``LlavaForConditionalGeneration.from_pretrained`` + ``AutoProcessor``, stock tower;
   (b) ``safellava.load`` with the Safe-CLIP tower, then ``.caption``;
   and reads each process's peak resident memory.
3. Generate: tokens/s of ``caption`` at 32 new tokens against a bare ``model.generate`` on the same
   inputs, alternating in one process.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

NEW_TOKENS = 32
# ViT-L/14-336 exactly as LLaVA-1.5 and Safe-CLIP have it.
VIT_L_336 = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=336,
    patch_size=14,
    projection_dim=768,
    hidden_act="quick_gelu",
)
NARROW_LM = dict(
    hidden_size=512,
    intermediate_size=1408,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=8,
    max_position_embeddings=2048,
)


def write_checkpoints(folder: Path, tower_dtype: str) -> tuple[Path, Path, Path]:
    """Write the LLaVA-shaped checkpoint, the Safe-CLIP-shaped CLIPModel and a test image."""
    import numpy as np
    import torch
    from make_tiny_checkpoints import build_llava, train_tokenizer
    from PIL import Image
    from transformers import (
        CLIPConfig,
        CLIPModel,
        CLIPTextConfig,
    )
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    tokenizer = train_tokenizer(folder / "tokenizer")
    llava = build_llava(
        folder / "llava", tokenizer, vision=VIT_L_336, text=NARROW_LM, never_stop=True, save_dtype="float16"
    )

    torch.manual_seed(1)
    clip = CLIPModel(
        CLIPConfig(
            vision_config=VIT_L_336,
            text_config=CLIPTextConfig(
                hidden_size=768,
                intermediate_size=3072,
                num_hidden_layers=12,
                num_attention_heads=12,
                projection_dim=768,
                bos_token_id=0,
                eos_token_id=2,
                pad_token_id=1,
            ).to_dict(),
            projection_dim=768,
        )
    )
    safeclip = folder / "safeclip"
    clip.to(getattr(torch, tower_dtype)).save_pretrained(safeclip)  # vision and text halves
    del clip

    image = folder / "photo.jpg"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)).save(image)
    return llava, safeclip, image


def child(kind: str, llava: str, safeclip: str, image: str) -> None:
    """One measured load + one-token caption; prints seconds and peak RSS as JSON."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch
    import transformers
    from PIL import Image

    import safellava
    from safellava import logs

    logs.configure(verbose=False)
    start = time.perf_counter()
    if kind == "plain":
        model = transformers.LlavaForConditionalGeneration.from_pretrained(llava, dtype=torch.float32)
        processor = transformers.AutoProcessor.from_pretrained(llava)
        prompt = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Caption."}]}],
            add_generation_prompt=True,
        )
        inputs = processor(images=Image.open(image).convert("RGB"), text=prompt, return_tensors="pt")
        output = model.generate(**inputs, max_new_tokens=1, do_sample=False)
        text = processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    else:
        model = safellava.load(model=llava, vision_tower=safeclip, device="cpu")
        text = model.caption(image, prompt="Caption.", max_new_tokens=1)
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"kind": kind, "seconds": seconds, "peak_mb": peak_mb, "text": text}))


def run_child(kind: str, llava: Path, safeclip: Path, image: Path) -> dict:
    command = [sys.executable, __file__, "--child", kind, str(llava), str(safeclip), str(image)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def time_command(command: list[str], rounds: int) -> list[float]:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        subprocess.run(command, capture_output=True, check=True)
        times.append(time.perf_counter() - start)
    return times


def generate_speed(llava: Path, safeclip: Path, image: Path, rounds: int) -> tuple[list[float], list[float]]:
    """Seconds for ``caption`` and for bare ``model.generate`` at 32 new tokens, alternating."""
    import torch

    import safellava
    from safellava import logs
    from safellava.generate import generation_kwargs

    logs.configure(verbose=False)
    loaded = safellava.load(model=str(llava), vision_tower=str(safeclip), device="cpu")
    options = loaded.generation_options(prompt="Caption.", max_new_tokens=NEW_TOKENS)
    prompt = loaded.engine.caption_prompt(options)
    inputs = loaded.engine.prepare([safellava.load_image(image)], [prompt]).to(
        loaded.model.device, dtype=loaded.model.dtype
    )
    kwargs = generation_kwargs(options, loaded.processor.tokenizer)
    caption_times, bare_times = [], []
    for index in range(rounds + 1):  # round 0 warms up
        start = time.perf_counter()
        loaded.caption(str(image), prompt="Caption.", max_new_tokens=NEW_TOKENS)
        caption_seconds = time.perf_counter() - start
        start = time.perf_counter()
        with torch.inference_mode():
            output = loaded.model.generate(**inputs, **kwargs)
        bare_seconds = time.perf_counter() - start
        assert output.shape[1] - inputs["input_ids"].shape[1] == NEW_TOKENS
        if index:
            caption_times.append(caption_seconds)
            bare_times.append(bare_seconds)
    return caption_times, bare_times


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):8.2f} {min(values):8.2f} {max(values):8.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds after the warm-up")
    parser.add_argument("--keep", type=Path, help="write the checkpoints here and keep them")
    parser.add_argument(
        "--tower-dtype",
        choices=("float16", "float32"),
        default="float16",
        help="dtype of the Safe-CLIP checkpoint; float16, as the LLaVA's, makes both towers cost the same to read",
    )
    parser.add_argument(
        "--child", nargs=4, metavar=("KIND", "LLAVA", "SAFECLIP", "IMAGE"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return

    folder = args.keep or Path(tempfile.mkdtemp(prefix="safellava-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        print(f"writing checkpoints to {folder} ...", flush=True)
        llava, safeclip, image = write_checkpoints(folder, args.tower_dtype)

        safellava_help = time_command([sys.executable, "-m", "safellava", "--help"], args.rounds)
        imports = time_command([sys.executable, "-c", "import torch, transformers"], args.rounds)

        rows: dict[str, list[dict]] = {"plain": [], "safellava": []}
        for index in range(args.rounds + 1):  # round 0 warms the page cache up
            for kind in ("plain", "safellava") if index % 2 else ("safellava", "plain"):
                result = run_child(kind, llava, safeclip, image)
                if index:
                    rows[kind].append(result)
        caption_times, bare_times = generate_speed(llava, safeclip, image, args.rounds)
    finally:
        if args.keep is None:
            shutil.rmtree(folder, ignore_errors=True)

    print(f"\n{'':44} {'median':>8} {'min':>8} {'max':>8}")
    print(f"{'start-up: safellava --help (s)':44} {summary(safellava_help)}")
    print(f"{'start-up: import torch, transformers (s)':44} {summary(imports)}")
    for kind, label in (("plain", "(a) plain transformers"), ("safellava", "(b) safellava + Safe-CLIP")):
        print(f"{label + ' load+caption (s)':44} {summary([r['seconds'] for r in rows[kind]])}")
        print(f"{label + ' peak RSS (MB)':44} {summary([r['peak_mb'] for r in rows[kind]])}")
    caption_rate = [NEW_TOKENS / t for t in caption_times]
    bare_rate = [NEW_TOKENS / t for t in bare_times]
    print(f"{'generate: caption tokens/s':44} {summary(caption_rate)}")
    print(f"{'generate: bare model.generate tokens/s':44} {summary(bare_rate)}")

    def ratio(key: str) -> float:
        return statistics.median(r[key] for r in rows["safellava"]) / statistics.median(
            r[key] for r in rows["plain"]
        )

    print(f"\n(b)/(a) median wall time:   {ratio('seconds'):.3f}   (target <= 1.10)")
    print(f"(b)/(a) median peak memory: {ratio('peak_mb'):.3f}   (target <= 1.10)")
    slowdown = statistics.median(caption_times) / statistics.median(bare_times)
    print(f"caption / bare generate time at {NEW_TOKENS} tokens: {slowdown:.3f}   (target <= 1.05)")


if __name__ == "__main__":
    main()
