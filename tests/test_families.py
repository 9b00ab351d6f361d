"""The family registry: every family's entry agrees with the tiny checkpoint of that family."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import CLIPVisionModel

from safellava.errors import ModelLoadError
from safellava.families import FAMILIES, family_of

FIXTURES = {"llava": "safe_llava", "llava_next": "safe_next", "llava_original": "safe_original"}


def test_every_family_has_a_tiny_checkpoint():
    assert set(FAMILIES) == set(FIXTURES)


@pytest.fixture(params=sorted(FAMILIES))
def loaded(request):
    return request.getfixturevalue(FIXTURES[request.param])


def test_the_config_names_the_family_and_its_class(loaded, tiny):
    raw = json.loads((Path(loaded.model_id) / "config.json").read_text())
    family = family_of(raw, loaded.model_id)
    assert family is loaded.family
    assert type(loaded.model) is family.model_type()


def test_tower_access_and_swap(loaded):
    family, model = loaded.family, loaded.model
    tower = family.tower(model)
    assert isinstance(tower, CLIPVisionModel)
    assert all(key.startswith(family.tower_prefix) for key in model.state_dict() if "vision_tower" in key)
    stand_in = torch.nn.Identity()
    family.set_tower(model, stand_in)
    try:
        assert family.tower(model) is stand_in
    finally:
        family.set_tower(model, tower)
    assert family.tower(model) is tower


def test_parts_cover_every_parameter_once(loaded):
    parts = loaded.family.parts(loaded.model)
    seen = []
    for items in parts.values():
        for item in items:
            seen += [item] if isinstance(item, torch.nn.Parameter) else list(item.parameters())
    assert len({id(p) for p in seen}) == len(seen)
    assert {id(p) for p in seen} == {id(p) for p in loaded.model.parameters()}


STOCK_TOWER_KEYS = {
    "llava": (
        "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight",  # llava-hf hub
        "model.vision_tower.encoder.layers.0.mlp.fc1.weight",  # transformers 5
        "vision_tower.encoder.layers.0.mlp.fc1.weight",  # transformers 5 save_pretrained
    ),
    "llava_original": ("model.vision_tower.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight",),
}
STOCK_TOWER_KEYS["llava_next"] = STOCK_TOWER_KEYS["llava"]


def test_stock_tower_keys_are_recognised_in_every_layout(loaded):
    pattern = loaded.family.stock_tower_key
    for key in STOCK_TOWER_KEYS[loaded.family.name]:
        match = pattern.match(key)
        assert match and key[match.end() :] == "encoder.layers.0.mlp.fc1.weight"
    for key in (
        "model.multi_modal_projector.linear_1.weight",
        "model.mm_projector.0.weight",
        "lm_head.weight",
    ):
        assert not pattern.match(key)


def test_modules_kept_out_of_quantization_exist(loaded):
    names = dict(loaded.model.named_modules()) | dict(loaded.model.named_parameters())
    assert all(name in names for name in loaded.family.not_quantized)


def test_an_unknown_model_type_is_refused_in_one_line(tiny):
    raw = json.loads((tiny.safeclip / "config.json").read_text())
    with pytest.raises(ModelLoadError, match=r"is a .clip. checkpoint, not LLaVA 1\.5 or 1\.6"):
        family_of(raw, str(tiny.safeclip))
