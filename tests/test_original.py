"""Original-format LLaVA checkpoints (the paper's setup): captions as the original code makes them.

The reference below is written from the original code's semantics (haotian-liu/LLaVA
``mm_utils.tokenizer_image_token``, ``CLIPVisionTower.feature_select``, the ``mm_projector`` and
``prepare_inputs_labels_for_multimodal``): the prompt tokenized in chunks around ``<image>``, the
image's features spliced in as input embeddings of a plain LLaMA, greedy decoding. It shares no
code with safellava's conversion to ``LlavaForConditionalGeneration``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaTokenizer,
)

import safellava
from safellava.cli import main
from safellava.config import load_preset

from .conftest import MAX_NEW_TOKENS, image_steers_the_answer

GOLDEN = json.loads((Path(__file__).parent / "golden" / "llava_prompts.json").read_text())["prompts"]
IMAGE_TOKEN_INDEX = -200  # llava/constants.py
OPENAI_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_STD = [0.26862954, 0.26130258, 0.27577711]


def expand2square(pil_img, background_color):
    """``llava/mm_utils.py``."""
    width, height = pil_img.size
    if width == height:
        return pil_img
    side = max(width, height)
    result = Image.new(pil_img.mode, (side, side), background_color)
    result.paste(pil_img, ((side - width) // 2, (side - height) // 2))
    return result


def tokenizer_image_token(prompt, tokenizer, image_token_index=IMAGE_TOKEN_INDEX):
    """``llava/mm_utils.py``."""
    prompt_chunks = [tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]

    def insert_separator(x, sep):
        return [ele for sublist in zip(x, [sep] * len(x), strict=True) for ele in sublist][:-1]

    input_ids = []
    offset = 0
    if len(prompt_chunks) > 0 and len(prompt_chunks[0]) > 0 and prompt_chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        input_ids.append(prompt_chunks[0][0])
    for x in insert_separator(prompt_chunks, [image_token_index] * (offset + 1)):
        input_ids.extend(x[offset:])
    return input_ids


def reference_caption(folder: Path, tower: Path, image: Image.Image, prompt: str, pad: bool) -> str:
    """What the original LLaVA code generates, greedily, for one image."""
    raw = json.loads((folder / "config.json").read_text())
    index = json.loads((folder / "pytorch_model.bin.index.json").read_text())
    state = {}
    for shard in sorted(set(index["weight_map"].values())):
        state.update(torch.load(folder / shard, weights_only=True))
    text = {
        k: v for k, v in raw.items() if not k.startswith("mm_") and k not in ("architectures", "model_type")
    }
    llama = LlamaForCausalLM(LlamaConfig(**text))
    llama.load_state_dict(
        {
            k: v.float()
            for k, v in state.items()
            if k.startswith(("model.", "lm_head.")) and "mm_projector" not in k and "vision_tower" not in k
        }
    )
    mm, hidden = raw["mm_hidden_size"], llama.config.hidden_size
    if raw.get("mm_projector_type") == "mlp2x_gelu":
        projector = torch.nn.Sequential(
            torch.nn.Linear(mm, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, hidden)
        )
    else:
        projector = torch.nn.Linear(mm, hidden)
    projector.load_state_dict(
        {k.removeprefix("model.mm_projector."): v.float() for k, v in state.items() if "mm_projector" in k}
    )
    vision = CLIPVisionModel.from_pretrained(tower)
    size = vision.config.image_size
    processor = CLIPImageProcessorPil(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=OPENAI_MEAN,
        image_std=OPENAI_STD,
    )
    if pad:
        image = expand2square(image, tuple(int(x * 255) for x in OPENAI_MEAN))
    pixels = processor(images=[image], return_tensors="pt")["pixel_values"]
    tokenizer = LlamaTokenizer.from_pretrained(
        folder
    )  # the original's AutoTokenizer(use_fast=False) gave this class
    ids = tokenizer_image_token(prompt, tokenizer)
    split = ids.index(IMAGE_TOKEN_INDEX)
    with torch.no_grad():
        hidden_states = vision(pixels, output_hidden_states=True).hidden_states
        features = projector(hidden_states[raw["mm_vision_select_layer"]][:, 1:])[0]  # "patch": CLS dropped
        embed = llama.get_input_embeddings()
        embeds = torch.cat(
            [embed(torch.tensor(ids[:split])), features, embed(torch.tensor(ids[split + 1 :]))]
        )
        out = llama.generate(
            inputs_embeds=embeds[None], attention_mask=torch.ones(1, embeds.shape[0], dtype=torch.long),
            max_new_tokens=MAX_NEW_TOKENS, do_sample=False, pad_token_id=tokenizer.eos_token_id,
        )  # fmt: skip
    return tokenizer.decode(out[0], skip_special_tokens=True).strip()


def _images():
    rng = np.random.default_rng(3)
    return [
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        for w, h in [(64, 48), (40, 96), (80, 80)]
    ]


@pytest.mark.parametrize(
    ("fixture", "checkpoint", "tower", "format_name", "pad"),
    [
        ("safe_original", "original_v15", "safeclip", "llava_v1", True),
        ("safe_lightning", "original_lightning", "safeclip_224", "llava_llama_2", False),
    ],
)
def test_greedy_captions_equal_the_original_code(request, tiny, fixture, checkpoint, tower, format_name, pad):
    loaded = request.getfixturevalue(fixture)
    assert loaded.prompt_format == format_name  # chosen from the name, as the original does
    prompt = GOLDEN[format_name]["single_turn"]
    assert loaded.engine.caption_prompt(loaded.generation_options(prompt="Describe this image.")) == prompt
    images = _images()
    ours = loaded.caption(images, prompt="Describe this image.")
    reference = [
        reference_caption(getattr(tiny, checkpoint), getattr(tiny, tower), image, prompt, pad)
        for image in images
    ]
    assert ours == reference
    assert image_steers_the_answer(loaded, images, prompt)  # the image matters


def test_without_padding_the_original_15_crops_as_the_original_would_then(tiny):
    loaded = safellava.load(
        model=str(tiny.original_v15),
        vision_tower=str(tiny.safeclip),
        device="cpu",
        max_new_tokens=MAX_NEW_TOKENS,
        pad_images=False,
    )
    images = _images()
    prompt = GOLDEN["llava_v1"]["single_turn"]
    expected = [
        reference_caption(tiny.original_v15, tiny.safeclip, image, prompt, pad=False) for image in images
    ]
    assert loaded.caption(images, prompt="Describe this image.") == expected


def test_the_prompt_is_tokenized_in_chunks_as_the_original(safe_original):
    processor = safe_original.processor
    prompt = GOLDEN["llava_v1"]["two_turn"]
    expected = tokenizer_image_token(prompt, processor.tokenizer, image_token_index=-1)
    ours = processor.token_ids(prompt)
    image_positions = [i for i, token in enumerate(ours) if token == processor.image_token_id]
    assert len(image_positions) == processor.image_tokens == 64
    first = image_positions[0]
    assert [*ours[:first], -1, *ours[first + 64 :]] == expected
    assert ours.count(processor.tokenizer.bos_token_id) == 1


def test_the_stock_tower_inside_the_checkpoint_is_never_read(tiny, monkeypatch):
    read = []
    real = torch.load

    def spying(*args, **kwargs):
        state = real(*args, **kwargs)
        return {k: _Spy(k, v, read) for k, v in state.items()}

    monkeypatch.setattr(torch, "load", spying)
    safellava.load(model=str(tiny.original_lightning), vision_tower=str(tiny.safeclip_224), device="cpu")
    assert any(k.startswith("model.layers.") for k in read)
    assert not [k for k in read if k.startswith("model.vision_tower.")]


class _Spy(torch.Tensor):
    """A tensor that notes its checkpoint key whenever its data is used."""

    @staticmethod
    def __new__(cls, key, tensor, read):
        spy = torch.Tensor._make_subclass(cls, tensor)
        spy.key, spy.read = key, read
        return spy

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        for arg in args:
            if isinstance(arg, _Spy):
                arg.read.append(arg.key)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))


def test_a_tower_that_does_not_fit_is_refused_in_one_line(tiny, capsys):
    code = main(
        ["caption", "x.png", "--model", str(tiny.original_lightning), "--vision-tower", str(tiny.safeclip)]
    )
    err = capsys.readouterr().err
    assert code in (1, 2)  # x.png does not exist: the image is checked first
    one = Image.new("RGB", (8, 8))
    path = tiny.llava.parent / "fit.png"
    one.save(path)
    code = main(
        ["caption", str(path), "--model", str(tiny.original_lightning), "--vision-tower", str(tiny.safeclip)]
    )
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1
    assert "image size 64 where the LLaVA needs 32. Use a CLIP ViT with hidden size 32, image size 32" in err


def test_a_pickle_that_runs_code_is_refused_in_an_original_checkpoint(tiny, tmp_path, capsys):
    class Payload:
        def __reduce__(self):
            return (open, (str(tmp_path / "ran"), "w"))

    folder = tmp_path / "llava-v1.5-evil"
    shutil.copytree(tiny.original_v15, folder)
    shard = folder / "pytorch_model-00002-of-00002.bin"
    torch.save({**torch.load(shard, weights_only=True), "payload": Payload()}, shard)
    image = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(image)
    code = main(["caption", str(image), "--model", str(folder), "--vision-tower", str(tiny.safeclip)])
    err = capsys.readouterr().err
    assert code == 2 and "safellava never runs code from a checkpoint" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "ran").exists()


def test_the_original_tower_is_the_one_the_checkpoint_names(tiny, safe_original):
    named = safellava.load(
        model=str(tiny.original_v15), vision_tower="original", device="cpu", max_new_tokens=MAX_NEW_TOKENS
    )
    explicit = safellava.load(
        model=str(tiny.original_v15),
        vision_tower=str(tiny.clip_stock),
        device="cpu",
        max_new_tokens=MAX_NEW_TOKENS,
    )
    images = _images()
    assert named.caption(images) == explicit.caption(images) != safe_original.caption(images)
    assert named.tower_fingerprint == explicit.tower_fingerprint


def _flags(tiny):
    return ["--model", str(tiny.original_v15), "--vision-tower", str(tiny.safeclip), "--device", "cpu"]


def test_batch_chat_compare_and_4bit_work_on_the_original_format(
    tiny, tmp_path, safe_original, capsys, monkeypatch
):
    import io
    import sys

    folder = tmp_path / "imgs"
    folder.mkdir()
    for index, image in enumerate(_images()):
        image.save(folder / f"{index}.png")
    out = tmp_path / "c.jsonl"
    assert (
        main(
            [
                "batch",
                str(folder),
                *_flags(tiny),
                "--format",
                "jsonl",
                "-o",
                str(out),
                "--max-new-tokens",
                str(MAX_NEW_TOKENS),
                "--batch-size",
                "3",
            ]
        )
        == 0
    )
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["caption"] for r in records] == safe_original.caption(
        [str(folder / f"{i}.png") for i in range(3)]
    )
    assert {r["prompt_format"] for r in records} == {"llava_v1"}
    capsys.readouterr()
    assert (
        main(
            [
                "compare",
                str(folder / "0.png"),
                *_flags(tiny),
                "--json",
                "--max-new-tokens",
                str(MAX_NEW_TOKENS),
            ]
        )
        == 0
    )
    compared = json.loads(capsys.readouterr().out)
    assert compared["safe"] == records[0]["caption"] and compared["original"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("Describe this image.\nAnd the colours?\n"))
    assert main(["chat", str(folder / "0.png"), *_flags(tiny), "--max-new-tokens", "4"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
    assert (
        main(["caption", str(folder / "0.png"), *_flags(tiny), "--quantize", "4bit", "--max-new-tokens", "4"])
        == 0
    )
    assert capsys.readouterr().out.strip()


def test_export_of_an_mlp_checkpoint_in_the_llava_hf_layout_and_refusal_of_a_linear_one(
    tiny, tmp_path, capsys
):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    target = tmp_path / "merged"
    assert main(["export", str(target), *_flags(tiny), "--dtype", "float32"]) == 0
    model = LlavaForConditionalGeneration.from_pretrained(target)
    processor = AutoProcessor.from_pretrained(target)
    assert model.config.image_token_index == processor.tokenizer.convert_tokens_to_ids("<image>")
    assert model.config.text_config.vocab_size % 64 == 0
    assert json.loads((target / "preprocessor_config.json").read_text())["do_pad"] is True
    expected = CLIPVisionModel.from_pretrained(tiny.safeclip).state_dict()
    for key, tensor in model.model.vision_tower.state_dict().items():
        assert torch.equal(tensor, expected[key]), key
    code = main(
        [
            "export",
            str(tmp_path / "linear"),
            "--model",
            str(tiny.original_lightning),
            "--vision-tower",
            str(tiny.safeclip_224),
        ]
    )
    assert code == 2
    assert "has a linear projector, which the llava-hf layout has no place for" in capsys.readouterr().err
    assert not (tmp_path / "linear").exists()


@pytest.mark.parametrize(
    ("name", "model", "tower", "prompt_format"),
    [
        (
            "paper",
            "liuhaotian/llava-llama-2-13b-chat-lightning-preview",
            "aimagelab/safeclip_vit-l_14",
            "llava_llama_2",
        ),
        ("paper-llava-1.5-13b", "liuhaotian/llava-v1.5-13b", "aimagelab/safeclip_vit-l_14_336", "llava_v1"),
    ],
)
def test_the_papers_presets(name, model, tower, prompt_format):
    preset = load_preset(name)
    assert (preset.model.model, preset.model.vision_tower, preset.model.prompt_format) == (
        model,
        tower,
        prompt_format,
    )
    assert preset.model.quantize == "8bit"
    generation = preset.generation
    assert (generation.temperature, generation.seed, generation.max_new_tokens, generation.prompt) == (
        0.2, 42, 128, "Describe this image."
    )  # fmt: skip
