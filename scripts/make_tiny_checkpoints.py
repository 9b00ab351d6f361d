#!/usr/bin/env python
"""Build tiny random LLaVA, LLaVA-NeXT and Safe-CLIP stand-in checkpoints, offline, in seconds.

They have the real classes, processors, chat templates and a sentencepiece tokenizer trained on the
spot, so everything the 7B models go through (tower swap, projector, templates, quantization,
generation, the CLI) runs on them for real. The tests import this module; a person can run it:

    python scripts/make_tiny_checkpoints.py /tmp/tiny

and then, for example, ``safellava caption photo.jpg --model /tmp/tiny/llava
--vision-tower /tmp/tiny/safeclip``.
"""

from __future__ import annotations

import argparse
import io
import json
import random
from dataclasses import dataclass
from pathlib import Path

# Shapes of the tiny vision tower: a CLIP ViT with 64 px images in 8 px patches (64 patches + CLS).
TINY_VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    image_size=64,  # 64 image tokens: as in the real models, the image outweighs the prompt
    patch_size=8,
    projection_dim=16,
)
TINY_TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
)
IMAGE_TOKEN = "<image>"

# Chat templates in the style the llava-hf checkpoints ship: images first, then text, per message.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'][0]['text'] + ' ' }}"
    "{% else %}{{ message['role'].upper() + ': ' }}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<image>\n' }}{% endif %}{% endfor %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ ' ' }}{% endif %}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
MISTRAL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' }}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<image>\n' }}{% endif %}{% endfor %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{{ ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ ' ' + part['text'] }}{% endif %}{% endfor %}"
    "{{ eos_token }}"
    "{% endif %}{% endfor %}"
)

_CORPUS = (
    "a the an this that man woman child dog cat bird horse car bus bicycle boat canal street road "
    "park beach city room table chair window tree sky water grass red blue green yellow black white "
    "jacket shirt hat photo picture image shows is are was riding walking sitting standing holding "
    "on in at with of and near under behind describe what happening here colour color there his her "
    "their USER ASSISTANT INST system you helpful assistant answer question questions detailed "
    "caption "
)


@dataclass(frozen=True)
class TinyCheckpoints:
    """Folders of the tiny checkpoints, as ``build_all`` wrote them."""

    llava: Path  # LlavaForConditionalGeneration with its processor and chat template
    llava_next: Path  # LlavaNextForConditionalGeneration with its processor and chat template
    safeclip: Path  # CLIPModel that fits both (the Safe-CLIP stand-in)
    safeclip_vision_only: Path  # the same vision weights saved as a CLIPVisionModel
    clip_wide: Path  # CLIPModel with a different hidden size
    clip_large_images: Path  # CLIPModel with a different image size
    clip_coarse_patches: Path  # CLIPModel with a different patch size
    original_v15: (
        Path  # original-format LLaVA-1.5 (LlavaLlamaForCausalLM): mlp2x_gelu projector, padded images
    )
    original_lightning: (
        Path  # original-format, as the paper's LLaMA-2 lightning model: linear projector, 32 px
    )
    safeclip_224: Path  # the Safe-CLIP stand-in that fits original_lightning (the paper's 224 px tower)
    clip_stock: Path  # the stock CLIP that original_v15 names as its mm_vision_tower
    clip_stock_224: Path  # the stock CLIP that original_lightning names (its weights are also inside it)


def train_tokenizer(out_dir: Path, seed: int = 0):
    """Train a small byte-fallback BPE sentencepiece model and wrap it as a Llama tokenizer."""
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    rng = random.Random(seed)
    words = _CORPUS.split()
    lines = [" ".join(rng.choice(words) for _ in range(14)) for _ in range(3000)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,
        # As LLaMA's tokenizer is built: text kept as written (newlines, repeated spaces), a dummy
        # prefix space, so the slow tokenizer of the original LLaVA code and transformers 5 agree.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.model").write_bytes(model.getvalue())
    tokenizer = LlamaTokenizer.from_pretrained(out_dir)
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    return tokenizer


def _vision_config(**overrides):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(**{**TINY_VISION, **overrides})


def _text_config(family: str, tokenizer, shape: dict):
    from transformers import LlamaConfig, MistralConfig

    config_class = LlamaConfig if family == "llava" else MistralConfig
    return config_class(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **shape,
    )


def build_llava(
    out_dir: Path,
    tokenizer,
    family: str = "llava",
    seed: int = 0,
    vision: dict | None = None,
    text: dict | None = None,
    never_stop: bool = False,
    save_dtype: str | None = None,
) -> Path:
    """Write a LLaVA-1.5 (``family="llava"``) or LLaVA-NeXT (``"llava_next"``) random checkpoint.

    ``vision``/``text`` override the tiny shapes (benchmarks use bigger ones); ``never_stop``
    makes end-of-sequence unreachable, so every answer has ``max_new_tokens`` tokens;
    ``save_dtype`` ("float16") saves in half precision, as llava-hf checkpoints are.
    """
    import torch
    from transformers import (
        CLIPImageProcessorPil,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
        LlavaProcessor,
    )

    vision = {**TINY_VISION, **(vision or {})}
    size, patch = vision["image_size"], vision["patch_size"]
    common = dict(
        vision_config=_vision_config(**vision),
        text_config=_text_config(family, tokenizer, {**TINY_TEXT, **(text or {})}),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=(size // patch) ** 2,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    if family == "llava":
        config = LlavaConfig(**common)
        model = LlavaForConditionalGeneration(config)
        image_processor = CLIPImageProcessorPil(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size}
        )
        processor = LlavaProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=patch,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
            chat_template=LLAVA_CHAT_TEMPLATE,
        )
    elif family == "llava_next":
        pinpoints = [[size, 2 * size], [2 * size, size], [2 * size, 2 * size]]
        config = LlavaNextConfig(**common, image_grid_pinpoints=pinpoints)
        model = LlavaNextForConditionalGeneration(config)
        image_processor = LlavaNextImageProcessorPil(
            size={"shortest_edge": size},
            crop_size={"height": size, "width": size},
            image_grid_pinpoints=pinpoints,
        )
        processor = LlavaNextProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=patch,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
            chat_template=MISTRAL_CHAT_TEMPLATE,
        )
    else:
        raise ValueError(f"unknown family {family!r}")
    _shape_tiny_model(model, tokenizer)
    if never_stop:
        with torch.no_grad():  # a logit of 0 is never the largest of a random head's
            model.lm_head.weight[tokenizer.eos_token_id] = 0.0
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if save_dtype is not None:
        model.to(getattr(torch, save_dtype))
    model.save_pretrained(out_dir)
    write_hub_layout(out_dir / "model.safetensors")
    processor.save_pretrained(out_dir)
    write_hub_processor_files(out_dir, processor)
    return out_dir


def write_hub_layout(weights: Path) -> None:
    """Rename the tower's keys as the llava-hf hub repos name them (``vision_tower.vision_model.*``).

    transformers 5 writes the language model under the hub's names but the tower without its
    ``vision_model.`` level; the checkpoints users download have it.
    """
    from safetensors.torch import load_file, save_file

    state = load_file(weights)
    renamed = {
        (
            "vision_tower.vision_model." + key.removeprefix("vision_tower.")
            if key.startswith("vision_tower.") and not key.startswith("vision_tower.vision_model.")
            else key
        ): tensor
        for key, tensor in state.items()
    }
    save_file(renamed, weights, metadata={"format": "pt"})


def write_hub_processor_files(out_dir: Path, processor) -> None:
    """``preprocessor_config.json`` and ``chat_template.json`` beside the processor, as hub repos ship them."""
    processor.image_processor.save_pretrained(out_dir)
    if processor.chat_template:
        (out_dir / "chat_template.json").write_text(
            json.dumps({"chat_template": processor.chat_template}, indent=2) + "\n"
        )


def _shape_tiny_model(model, tokenizer) -> None:
    """Nudge the random weights so that captions read as words and depend on the image."""
    import torch

    with torch.no_grad():
        # Large image features next to token embeddings: the image steers the caption.
        model.model.multi_modal_projector.linear_2.weight.mul_(8.0)
        # Byte-fallback pieces get zero logits, below about half of the word pieces: no stray bytes.
        vocab = tokenizer.get_vocab()
        byte_ids = [i for piece, i in vocab.items() if piece.startswith("<0x") and piece.endswith(">")]
        model.lm_head.weight[byte_ids] = 0.0


def build_clip(out_dir: Path, seed: int, vision_only: bool = False, **vision_overrides) -> Path:
    """Write a tiny CLIP checkpoint (a ``CLIPModel`` as Safe-CLIP ships, or a ``CLIPVisionModel``)."""
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionModel

    torch.manual_seed(seed)
    vision = _vision_config(**vision_overrides)
    if vision_only:
        CLIPVisionModel(vision).save_pretrained(out_dir)
        return out_dir
    text = CLIPTextConfig(
        vocab_size=99,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=16,
        projection_dim=TINY_VISION["projection_dim"],
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
    )
    config = CLIPConfig(
        text_config=text.to_dict(),
        vision_config=vision.to_dict(),
        projection_dim=TINY_VISION["projection_dim"],
    )
    CLIPModel(config).save_pretrained(out_dir)
    return out_dir


ORIGINAL_TOKENIZER_CONFIG = {
    "tokenizer_class": "LlamaTokenizer",
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "pad_token": "<unk>",
    "add_bos_token": True,
    "add_eos_token": False,
    "clean_up_tokenization_spaces": False,
    "legacy": False,
    "model_max_length": 2048,
    "padding_side": "right",
}


def build_original(
    out_dir: Path,
    sentencepiece_model: Path,
    stock_tower: Path,
    *,
    projector: str = "mlp2x_gelu",
    image_aspect_ratio: str | None = "pad",
    model_type: str = "llava_llama",
    seed: int = 0,
    shards: int = 2,
    stock_tower_inside: bool = False,
) -> Path:
    """Write an original-format LLaVA checkpoint (haotian-liu/LLaVA's ``LlavaLlamaForCausalLM``).

    As the liuhaotian/* repos: ``mm_*`` config keys, LLaMA weights as ``model.*`` and ``lm_head.*``,
    the projector as ``model.mm_projector.*`` (``0``/``2`` for ``mlp2x_gelu``), ``pytorch_model-*.bin``
    shards with ``pytorch_model.bin.index.json``, a sentencepiece tokenizer without an ``<image>``
    token; ``stock_tower_inside`` adds the stock tower's weights under
    ``model.vision_tower.vision_tower.*`` as some finetunes ship them.
    """
    import shutil

    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    vision = CLIPVisionConfig.from_pretrained(stock_tower)
    vocab = _sentencepiece_vocab(sentencepiece_model)
    text = LlamaConfig(vocab_size=len(vocab), bos_token_id=1, eos_token_id=2, pad_token_id=0, **TINY_TEXT)
    torch.manual_seed(seed)
    language = LlamaForCausalLM(text)
    hidden = text.hidden_size
    if projector == "mlp2x_gelu":
        layers = {"0": torch.nn.Linear(vision.hidden_size, hidden), "2": torch.nn.Linear(hidden, hidden)}
        last = layers["2"]
        projection = {
            f"model.mm_projector.{i}.{n}": t
            for i, layer in layers.items()
            for n, t in layer.state_dict().items()
        }
    else:
        last = torch.nn.Linear(vision.hidden_size, hidden)
        projection = {f"model.mm_projector.{n}": t for n, t in last.state_dict().items()}
    with torch.no_grad():
        last.weight.mul_(8.0)  # the image steers the caption, as in _shape_tiny_model
        language.lm_head.weight[[i for piece, i in vocab.items() if piece.startswith("<0x")]] = 0.0
    state = {**language.state_dict(), **{k: v.detach().clone() for k, v in projection.items()}}
    if stock_tower_inside:
        tower = CLIPVisionModel.from_pretrained(stock_tower).state_dict()
        state.update({f"model.vision_tower.vision_tower.vision_model.{k}": v for k, v in tower.items()})
    state = {k: v.to(torch.float16).contiguous() for k, v in state.items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    names = sorted(state)
    weight_map = {}
    for index in range(shards):
        filename = f"pytorch_model-{index + 1:05d}-of-{shards:05d}.bin"
        part = names[index::shards]
        torch.save({k: state[k] for k in part}, out_dir / filename)
        weight_map.update(dict.fromkeys(part, filename))
    total = sum(t.numel() * t.element_size() for t in state.values())
    (out_dir / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n"
    )
    config = {
        **{k: v for k, v in text.to_dict().items() if k not in ("architectures", "transformers_version")},
        "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": model_type,
        "mm_hidden_size": vision.hidden_size,
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "mm_vision_tower": str(stock_tower),
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "torch_dtype": "float16",
    }
    if projector != "linear":
        config["mm_projector_type"] = projector
    if image_aspect_ratio is not None:
        config["image_aspect_ratio"] = image_aspect_ratio
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    shutil.copy(sentencepiece_model, out_dir / "tokenizer.model")
    (out_dir / "tokenizer_config.json").write_text(json.dumps(ORIGINAL_TOKENIZER_CONFIG, indent=2) + "\n")
    special = {k: ORIGINAL_TOKENIZER_CONFIG[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return out_dir


def _sentencepiece_vocab(model: Path) -> dict[str, int]:
    import sentencepiece as spm

    processor = spm.SentencePieceProcessor(model_file=str(model))
    return {processor.id_to_piece(i): i for i in range(processor.get_piece_size())}


def build_all(out_dir: Path | str) -> TinyCheckpoints:
    """Build every tiny checkpoint under ``out_dir`` and return their folders."""
    import torch
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(out / "tokenizer")
    build_llava(out / "llava", tokenizer, "llava", seed=1)
    build_llava(out / "llava_next", tokenizer, "llava_next", seed=2)
    build_clip(out / "safeclip", seed=3)
    # The vision-only variant carries exactly the Safe-CLIP stand-in's vision weights.
    from transformers import CLIPVisionModel

    torch.manual_seed(0)
    CLIPVisionModel.from_pretrained(out / "safeclip").save_pretrained(out / "safeclip_vision_only")
    build_clip(out / "clip_wide", seed=4, hidden_size=48)
    build_clip(out / "clip_large_images", seed=5, image_size=96)
    build_clip(out / "clip_coarse_patches", seed=6, patch_size=16)
    build_clip(out / "clip_stock", seed=7)
    build_clip(out / "clip_stock_224", seed=8, image_size=32)
    build_clip(out / "safeclip_224", seed=9, image_size=32)
    sentencepiece = out / "tokenizer" / "tokenizer.model"
    original = out / "original"
    build_original(original / "llava-v1.5-tiny", sentencepiece, out / "clip_stock", seed=10)
    build_original(
        original / "llava-llama-2-tiny-chat-lightning-preview",
        sentencepiece,
        out / "clip_stock_224",
        projector="linear",
        image_aspect_ratio=None,
        model_type="llava",
        seed=11,
        stock_tower_inside=True,
    )
    paths = TinyCheckpoints(
        llava=out / "llava",
        llava_next=out / "llava_next",
        safeclip=out / "safeclip",
        safeclip_vision_only=out / "safeclip_vision_only",
        clip_wide=out / "clip_wide",
        clip_large_images=out / "clip_large_images",
        clip_coarse_patches=out / "clip_coarse_patches",
        original_v15=original / "llava-v1.5-tiny",
        original_lightning=original / "llava-llama-2-tiny-chat-lightning-preview",
        safeclip_224=out / "safeclip_224",
        clip_stock=out / "clip_stock",
        clip_stock_224=out / "clip_stock_224",
    )
    (out / "index.json").write_text(
        json.dumps({k: str(v) for k, v in paths.__dict__.items()}, indent=2) + "\n"
    )
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="folder to write the checkpoints into")
    args = parser.parse_args()
    paths = build_all(args.out_dir)
    for name, path in paths.__dict__.items():
        print(f"{name:22} {path}")


if __name__ == "__main__":
    main()
