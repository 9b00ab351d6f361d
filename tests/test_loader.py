"""The tower swap: exactly the Safe-CLIP weights, the same features, different captions."""

from __future__ import annotations

import shutil

import pytest
import torch
from transformers import CLIPVisionModel

import safellava
from safellava import weights
from safellava.errors import IncompatibleTowerError, ModelLoadError
from safellava.families import LLAVA

from .conftest import image_steers_the_answer


def _safeclip_vision(tiny) -> CLIPVisionModel:
    return CLIPVisionModel.from_pretrained(tiny.safeclip)


@pytest.mark.parametrize("fixture", ["safe_llava", "safe_next"])
def test_tower_tensors_equal_safe_clip_vision_weights(request, tiny, fixture):
    loaded = request.getfixturevalue(fixture)
    expected = _safeclip_vision(tiny).state_dict()
    actual = loaded.model.model.vision_tower.state_dict()
    assert set(actual) == set(expected)
    for key, tensor in expected.items():
        assert torch.equal(actual[key], tensor), key


def test_vision_only_checkpoint_loads_the_same_tower(tiny, safe_llava):
    from_vision_only = safellava.load(
        model=str(tiny.llava), vision_tower=str(tiny.safeclip_vision_only), device="cpu"
    )
    expected = safe_llava.model.model.vision_tower.state_dict()
    for key, tensor in from_vision_only.model.model.vision_tower.state_dict().items():
        assert torch.equal(tensor, expected[key]), key


def test_rest_of_the_model_is_the_llava_checkpoint(safe_llava, original_llava):
    safe, stock = safe_llava.model.state_dict(), original_llava.model.state_dict()
    assert set(safe) == set(stock)
    for key in safe:
        if not key.startswith("model.vision_tower."):
            assert torch.equal(safe[key], stock[key]), key
    tower_key = "model.vision_tower.embeddings.patch_embedding.weight"
    assert not torch.equal(safe[tower_key], stock[tower_key])


def test_image_features_match_standalone_safe_clip_through_projector(tiny, safe_llava, images):
    processor, model = safe_llava.processor, safe_llava.model
    pixels = processor.image_processor(images=[safellava.load_image(images[0])], return_tensors="pt")
    pixels = pixels["pixel_values"]
    with torch.no_grad():
        llava_features = model.model.get_image_features(pixel_values=pixels).pooler_output[0]
        hidden = _safeclip_vision(tiny)(pixels, output_hidden_states=True).hidden_states
        layer = model.config.vision_feature_layer
        expected = model.model.multi_modal_projector(hidden[layer][:, 1:])[0]  # CLS dropped
    assert llava_features.shape == (64, model.config.text_config.hidden_size)
    torch.testing.assert_close(llava_features, expected)


def test_safe_and_original_towers_give_different_greedy_captions(safe_llava, original_llava, images):
    safe = safe_llava.caption([str(p) for p in images])
    stock = original_llava.caption([str(p) for p in images])
    assert all(safe) and all(stock)
    assert safe != stock
    assert safe_llava.caption(str(images[0])) == safe[0]  # greedy is deterministic


def test_stock_tower_and_text_half_are_never_read(tiny, monkeypatch):
    """Only the kept tensors are materialized: the stock tower and CLIP's text half stay on disk."""
    read: list[str] = []

    class Spy:
        def __init__(self, key, lazy):
            self.key, self.lazy = key, lazy

        def __getitem__(self, index):
            read.append(self.key)
            return self.lazy[index]

        def __getattr__(self, name):
            return getattr(self.lazy, name)

    opened = weights.open_lazy_state_dict

    def spying(files):
        class Context:
            def __enter__(self):
                self.inner = opened(files)
                state = self.inner.__enter__()
                return {key: Spy(key, value) for key, value in state.items()}

            def __exit__(self, *exc):
                return self.inner.__exit__(*exc)

        return Context()

    monkeypatch.setattr("safellava.loader.open_lazy_state_dict", spying)
    safellava.load(model=str(tiny.llava), vision_tower=str(tiny.safeclip), device="cpu")
    assert read, "the spy saw no reads"
    assert any(key.startswith("vision_model.") for key in read)
    assert not [key for key in read if LLAVA.stock_tower_key.match(key)]
    assert not [key for key in read if key.startswith(("text_model.", "text_projection", "logit_scale"))]


@pytest.mark.parametrize(
    ("tower", "mismatch"),
    [
        ("clip_wide", "hidden size 48 where the LLaVA needs 32"),
        ("clip_large_images", "image size 96 where the LLaVA needs 64"),
        ("clip_coarse_patches", "patch size 16 where the LLaVA needs 8"),
    ],
)
def test_incompatible_towers_are_refused_before_loading(tiny, tower, mismatch):
    with pytest.raises(IncompatibleTowerError) as caught:
        safellava.load(model=str(tiny.llava), vision_tower=str(getattr(tiny, tower)), device="cpu")
    message = str(caught.value)
    assert mismatch in message
    assert "Use a CLIP ViT with hidden size 32, image size 64 and patch size 8" in message
    assert "\n" not in message


def test_incomplete_tower_checkpoint_is_refused(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    partial = tmp_path / "partial"
    shutil.copytree(tiny.safeclip, partial)
    state = load_file(partial / "model.safetensors")
    del state["vision_model.post_layernorm.weight"]
    save_file(state, partial / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"lacks 1 of its .* vision weights .*post_layernorm.weight"):
        safellava.load(model=str(tiny.llava), vision_tower=str(partial), device="cpu")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"model": "{safeclip}"}, "is a 'clip' checkpoint, not LLaVA"),
        ({"model": "{missing}"}, "model folder .* does not exist"),
        ({"model": "no-such-org/no-such-model"}, "cannot load model no-such-org/no-such-model"),
        ({"vision_tower": "{llava}"}, "is a 'llava' checkpoint, not CLIP"),
        ({"vision_tower": "{missing}"}, "vision tower folder .* does not exist"),
    ],
)
def test_wrong_or_missing_checkpoints_are_model_load_errors(tiny, tmp_path, kwargs, message):
    paths = {"safeclip": tiny.safeclip, "llava": tiny.llava, "missing": tmp_path / "nothing-here"}
    arguments = {"model": str(tiny.llava), "vision_tower": str(tiny.safeclip), "device": "cpu"}
    arguments.update({key: value.format(**paths) for key, value in kwargs.items()})
    with pytest.raises(ModelLoadError, match=message):
        safellava.load(**arguments)


def test_llava_next_gets_image_sizes_and_batches_mixed_shapes(safe_next, images):
    opened = [safellava.load_image(p) for p in images]
    inputs = safe_next.processor(images=opened, text=["<image>\nx"] * 3, padding=True, return_tensors="pt")
    assert inputs["image_sizes"].tolist() == [[48, 64], [48, 64], [96, 24]]
    together = safe_next.caption([str(p) for p in images], batch_size=3)
    alone = [safe_next.caption(str(p)) for p in images]
    assert together == alone
    prompt = safe_next.engine.caption_prompt(safe_next.generation_options())
    assert image_steers_the_answer(safe_next, opened, prompt)  # the image matters


def test_loaded_object_names_what_it_loaded(tiny, safe_llava):
    assert safe_llava.model_id == str(tiny.llava)
    assert safe_llava.vision_tower == str(tiny.safeclip)
    assert safe_llava.family.name == "llava"
    assert safe_llava.preset is None
    assert safe_llava.model.dtype == torch.float32
    assert safe_llava.model.config.name_or_path == str(tiny.llava)
    assert safe_llava.provenance.vision_tower == str(tiny.safeclip)


class _Payload:
    """Unpickling this runs code: it creates the file ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("tower", ["safe", "original"])
def test_a_pickle_that_runs_code_is_refused_in_one_line_and_never_runs(tiny, images, tmp_path, capsys, tower):
    from safetensors.torch import load_file

    from safellava.cli import main

    folder = tmp_path / "llava"
    shutil.copytree(tiny.llava, folder)
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "ran"
    torch.save({**state, "payload": _Payload(marker)}, folder / "pytorch_model.bin")
    vision_tower = str(tiny.safeclip) if tower == "safe" else "original"
    code = main(
        ["caption", str(images[0]), "--model", str(folder), "--vision-tower", vision_tower, "--device", "cpu"]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert err.splitlines()[-1].startswith("safellava: error: ")
    assert "safellava never runs code from a checkpoint" in err
    assert "weights_only=False" not in err and "Traceback" not in err
    assert not marker.exists()
