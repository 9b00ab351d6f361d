"""Original-format LLaVA checkpoints (haotian-liu/LLaVA's ``LlavaLlamaForCausalLM``, the liuhaotian/* repos).

They are converted at load into a transformers ``LlavaForConditionalGeneration``, so that the
engine, quantization, batch, chat, compare and export treat them as any other LLaVA, while keeping
the original's semantics:

- the language model's ``model.*``/``lm_head.*`` weights go to ``model.language_model.*``/``lm_head.*``;
  the projector (``mlp2x_gelu``: Linear, GELU, Linear under ``model.mm_projector.0/2``; ``linear``:
  one Linear under ``model.mm_projector``, followed here by an exact identity) to
  ``model.multi_modal_projector``; a stock tower inside the checkpoint is never read;
- the image features are hidden state ``mm_vision_select_layer``, without the CLS token for
  ``mm_vision_select_feature: patch``, as the original's ``CLIPVisionTower`` selects them;
- the prompt is split on ``<image>`` and each chunk tokenized apart, BOS kept once
  (``mm_utils.tokenizer_image_token``); the image's features go where the placeholder was;
- images are prepared by the stock CLIP processor of the tower's size (OpenAI CLIP mean and std,
  bicubic, shortest-edge resize, centre crop), padded to a square first when the checkpoint says
  ``image_aspect_ratio: pad``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from .errors import ModelLoadError, UsageError, load_failure

ARCHITECTURES = ("LlavaLlamaForCausalLM",)
OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
PROJECTORS = ("linear", "mlp2x_gelu")
IMAGE_PLACEHOLDER = "<image>"
IM_START, IM_END, IM_PATCH = "<im_start>", "<im_end>", "<im_patch>"
_STOCK_TOWER_SHAPE = re.compile(r"patch(\d+)(?:-(\d+))?")


def read_raw_config(source: str, revision: str | None) -> dict[str, Any] | None:
    """A checkpoint's ``config.json`` as written (a ``ModelLoadError`` when it cannot be read)."""
    from transformers.utils import cached_file

    try:
        path = cached_file(source, "config.json", revision=revision)
    except OSError as exc:
        raise ModelLoadError(f"cannot load model {source}: {load_failure(source, exc)}") from None
    if path is None:
        return None
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read the config of {source}: {exc}") from None
    return raw if isinstance(raw, dict) else None


def is_original_format(raw: dict[str, Any] | None) -> bool:
    """Whether a config is the original LLaVA code's (``LlavaLlamaForCausalLM`` with ``mm_*`` keys)."""
    if not raw:
        return False
    return any(a in ARCHITECTURES for a in raw.get("architectures") or []) or "mm_vision_tower" in raw


def stock_tower_config(raw: dict[str, Any]) -> Any:
    """The vision config of the tower the checkpoint was trained with (``mm_vision_tower``).

    A local folder's config is read; a hub id is not downloaded but read by name
    (``...-patch14`` is 224 px, ``...-patch14-336`` 336 px; a name that says neither, ViT-L/14 at 224).
    """
    from transformers import CLIPVisionConfig

    hidden = int(raw.get("mm_hidden_size") or 1024)
    name = str(raw.get("mm_vision_tower") or "")
    folder = Path(name).expanduser()
    if name and folder.is_dir() and (folder / "config.json").is_file():
        from .vision import read_tower_config

        return read_tower_config(str(folder)).config
    match = _STOCK_TOWER_SHAPE.search(name)
    return CLIPVisionConfig(
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_attention_heads=max(1, hidden // 64),
        num_hidden_layers=24,  # ViT-L; only the fit check reads it, against mm_vision_select_layer
        patch_size=int(match.group(1)) if match else 14,
        image_size=int(match.group(2) or 224) if match else 224,
    )


def convert_config(raw: dict[str, Any], source: str) -> Any:
    """The ``LlavaConfig`` of an original-format checkpoint; what the conversion needs rides along in ``original``."""
    from transformers import LlamaConfig, LlavaConfig

    projector = raw.get("mm_projector_type") or "linear"
    if projector not in PROJECTORS:
        raise ModelLoadError(
            f"model {source} has a {projector!r} projector: original-format checkpoints with a "
            f"{' or '.join(PROJECTORS)} projector are supported"
        )
    feature = raw.get("mm_vision_select_feature") or "patch"
    if feature not in ("patch", "cls_patch"):
        raise ModelLoadError(f"model {source}: unknown mm_vision_select_feature {feature!r}")
    text = {
        k: v for k, v in raw.items() if not k.startswith("mm_") and k not in ("architectures", "model_type")
    }
    vision = stock_tower_config(raw)
    patches = (vision.image_size // vision.patch_size) ** 2
    config = LlavaConfig(
        text_config=LlamaConfig(**text),
        vision_config=vision,
        image_token_index=0,  # <unk>: never produced by a byte-fallback LLaMA tokenizer (checked at load)
        image_seq_length=patches + (feature == "cls_patch"),
        projector_hidden_act="gelu" if projector == "mlp2x_gelu" else "linear",
        vision_feature_select_strategy="default" if feature == "patch" else "full",
        vision_feature_layer=raw.get("mm_vision_select_layer", -2),
        multimodal_projector_bias=True,
    )
    config.original = {
        "projector": projector,
        "image_aspect_ratio": raw.get("image_aspect_ratio"),
        "mm_use_im_start_end": bool(raw.get("mm_use_im_start_end", False)),
        "mm_use_im_patch_token": bool(raw.get("mm_use_im_patch_token", False)),
        "mm_vision_tower": raw.get("mm_vision_tower"),
        "name": Path(source.rstrip("/")).name,
    }
    return config


def default_format(config: Any) -> str:
    """The conversation mode the original code picks from the model's name (``llava_v1`` when it says nothing)."""
    name = config.original["name"].lower()
    if "llama-2" in name:
        return "llava_llama_2"
    if "mistral" in name:
        return "mistral_instruct"
    if "v1.6-34b" in name:
        return "chatml_direct"
    return "llava_v1"


_STOCK_TOWER = re.compile(r"^model\.vision_tower\.")
_LANGUAGE = re.compile(r"^model\.(embed_tokens|layers|norm)\.")


def converted_state(checkpoint: dict[str, Any], config: Any) -> dict[str, Any]:
    """The checkpoint's language model and projector under ``LlavaForConditionalGeneration``'s names.

    The stock tower inside some checkpoints (``model.vision_tower.vision_tower.*``) is left unread.
    """
    import torch

    state: dict[str, Any] = {}
    mlp = config.original["projector"] == "mlp2x_gelu"
    for key, tensor in checkpoint.items():
        if _STOCK_TOWER.match(key):
            continue
        if _LANGUAGE.match(key):
            state["model.language_model." + key.removeprefix("model.")] = tensor
        elif key.startswith("lm_head."):
            state[key] = tensor
        elif key.startswith("model.mm_projector."):
            rest = key.removeprefix("model.mm_projector.")
            if mlp:
                index, _, name = rest.partition(".")
                layer = {"0": "linear_1", "2": "linear_2"}.get(index)
                if layer is None:
                    raise ModelLoadError(f"unexpected projector weight {key} for an mlp2x_gelu projector")
                state[f"model.multi_modal_projector.{layer}.{name}"] = tensor
            else:
                state[f"model.multi_modal_projector.linear_1.{rest}"] = tensor
    if not mlp:
        # A linear projector: linear_2 is the identity, so the output is linear_1's, exactly.
        size = config.text_config.hidden_size
        state["model.multi_modal_projector.linear_2.weight"] = torch.eye(size)
        state["model.multi_modal_projector.linear_2.bias"] = torch.zeros(size)
    missing = [
        name
        for name in (
            "lm_head.weight",
            "model.language_model.embed_tokens.weight",
            "model.multi_modal_projector.linear_1.weight",
        )
        if name not in state
    ]
    if missing:
        raise ModelLoadError(
            f"the checkpoint lacks {missing[0]} (under its original name): is it a LLaVA checkpoint?"
        )
    return state


def image_processor(tower_config: Any, pad: bool) -> Any:
    """The stock CLIP image processor of the tower's size, padding to a square first when ``pad``."""
    from transformers import CLIPImageProcessorPil, LlavaImageProcessorPil
    from transformers.image_utils import PILImageResampling

    size = tower_config.image_size
    settings = {
        "size": {"shortest_edge": size},
        "crop_size": {"height": size, "width": size},
        "image_mean": OPENAI_CLIP_MEAN,
        "image_std": OPENAI_CLIP_STD,
        "resample": PILImageResampling.BICUBIC,
        "do_center_crop": True,
        "do_convert_rgb": True,
    }
    return LlavaImageProcessorPil(**settings, do_pad=True) if pad else CLIPImageProcessorPil(**settings)


class ChunkedProcessor:
    """Tokenizes and preprocesses as the original LLaVA code, behind the processor interface the engine uses.

    The prompt is split on ``<image>``, each chunk tokenized apart (BOS kept once), and the image's
    ``image_tokens`` placeholders go where ``<image>`` was; batches are padded on the left.
    """

    def __init__(
        self, tokenizer: Any, image_processor: Any, image_token_id: int, image_tokens: int, start_end: bool
    ):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.image_token_id = image_token_id
        self.image_tokens = image_tokens
        self.start_end = start_end  # mm_use_im_start_end: <im_start><image><im_end>
        self.chat_template = None

    def token_ids(self, prompt: str) -> list[int]:
        """``tokenizer_image_token`` of the original, with each image placeholder expanded."""
        if self.start_end:
            prompt = prompt.replace(IMAGE_PLACEHOLDER, IM_START + IMAGE_PLACEHOLDER + IM_END)
        chunks = [self.tokenizer(chunk).input_ids for chunk in prompt.split(IMAGE_PLACEHOLDER)]
        bos = self.tokenizer.bos_token_id
        offset = 1 if chunks and chunks[0] and chunks[0][0] == bos else 0
        ids = [bos] if offset else []
        for index, chunk in enumerate(chunks):
            if index:
                ids.extend([self.image_token_id] * self.image_tokens)
            if self.image_token_id in chunk[offset:]:
                raise UsageError(
                    "the prompt's text tokenizes to the image placeholder token: change the prompt"
                )
            ids.extend(chunk[offset:])
        return ids

    def __call__(
        self, images: Any = None, text: Any = None, padding: bool = True, return_tensors: str = "pt"
    ) -> Any:
        from transformers import BatchFeature

        batch = self.tokenizer.pad(
            {"input_ids": [self.token_ids(prompt) for prompt in text]},
            padding=padding,
            return_tensors=return_tensors,
        )
        data = dict(batch)
        if images:
            data["pixel_values"] = self.image_processor(images=list(images), return_tensors=return_tensors)[
                "pixel_values"
            ]
        return BatchFeature(data)

    def batch_decode(self, *args: Any, **kwargs: Any) -> list[str]:
        """Decoded text, as the tokenizer decodes."""
        return self.tokenizer.batch_decode(*args, **kwargs)


def load_processor(
    source: str, revision: str | None, config: Any, tower_config: Any, pad: bool
) -> ChunkedProcessor:
    """The checkpoint's tokenizer with the original's image tokens, and the stock CLIP processor of the tower."""
    from transformers import AutoTokenizer

    try:
        # With the LLaMA config: a config.json that says model_type "llava" (the lightning layout) would
        # otherwise get a generic tokenizer that drops sentencepiece's leading space (transformers >= 5.7).
        tokenizer = AutoTokenizer.from_pretrained(source, revision=revision, config=config.text_config)
    except (OSError, ValueError, TypeError) as exc:
        raise ModelLoadError(f"cannot load the tokenizer of {source}: {load_failure(source, exc)}") from None
    original = config.original
    added = ([IM_PATCH] if original["mm_use_im_patch_token"] else []) + (
        [IM_START, IM_END] if original["mm_use_im_start_end"] else []
    )
    if added:  # as the original builder adds them, in this order (their ids follow the vocabulary)
        tokenizer.add_tokens(added, special_tokens=True)
    if tokenizer.unk_token_id != config.image_token_index:
        raise ModelLoadError(
            f"the tokenizer of {source} has no <unk> token at id {config.image_token_index} for the image placeholder"
        )
    if tokenizer.pad_token_id in (None, config.image_token_index):
        tokenizer.pad_token = tokenizer.eos_token  # padding must not look like image positions
    tokenizer.padding_side = "left"
    return ChunkedProcessor(
        tokenizer,
        image_processor(tower_config, pad),
        config.image_token_index,
        config.image_seq_length,
        original["mm_use_im_start_end"],
    )
