"""4-bit and 8-bit: only the language model is quantized, and captions still come out (on the CPU)."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch

import safellava

KEPT = ("model.vision_tower.", "model.multi_modal_projector.", "model.image_newline", "lm_head")


def _bnb_layers(model) -> dict[str, str]:
    return {
        name: type(module).__name__
        for name, module in model.named_modules()
        if isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))
    }


@pytest.mark.parametrize(
    ("family", "quantize", "layer_class"),
    [
        ("llava", "4bit", "Linear4bit"),
        ("llava_next", "4bit", "Linear4bit"),
        ("llava", "8bit", "Linear8bitLt"),
    ],
)
def test_only_the_language_model_is_quantized(tiny, images, family, quantize, layer_class):
    loaded = safellava.load(
        model=str(getattr(tiny, family)),
        vision_tower=str(tiny.safeclip),
        quantize=quantize,
        device="cpu",
        max_new_tokens=6,
    )
    model = loaded.model
    layers = _bnb_layers(model)
    assert not [name for name in layers if name.startswith(KEPT)]
    assert set(layers.values()) == {layer_class}

    language_linears = {
        name
        for name, module in model.named_modules()
        if name.startswith("model.language_model.") and isinstance(module, torch.nn.Linear)
    }
    assert language_linears
    assert language_linears == set(layers)  # every linear layer of the language model

    compute = torch.bfloat16 if quantize == "4bit" else torch.float16
    for name, module in model.named_modules():
        if name.startswith(("model.vision_tower.", "model.multi_modal_projector.")) and isinstance(
            module, torch.nn.Linear
        ):
            assert type(module) is torch.nn.Linear, name
            assert module.weight.dtype == compute, name
    assert type(model.lm_head) is torch.nn.Linear
    assert model.lm_head.weight.dtype == compute
    if quantize == "4bit":
        config = model.config.quantization_config
        assert config.bnb_4bit_quant_type == "nf4"
        assert config.bnb_4bit_use_double_quant is True
        assert config.bnb_4bit_compute_dtype == torch.bfloat16

    caption = loaded.caption(str(images[0]))
    assert isinstance(caption, str) and caption
