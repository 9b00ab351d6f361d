"""export: the merged model in the llava-hf layout, loadable by plain transformers and engines."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch
from transformers import (
    AutoProcessor,
    CLIPVisionModel,
    LlavaForConditionalGeneration,
    LlavaNextForConditionalGeneration,
)

from safellava import export as export_module
from safellava.chat_templates import CHAT_TEMPLATES
from safellava.cli import main
from safellava.errors import UsageError
from safellava.export import export
from safellava.prompts import single_turn, to_chat_messages
from safellava.writers import ordinary_mode

from .conftest import MAX_NEW_TOKENS, load_tiny

CLASSES = {"llava": LlavaForConditionalGeneration, "llava_next": LlavaNextForConditionalGeneration}


def _flags(tiny, tower=None):
    return ["--model", str(tiny.llava), "--vision-tower", str(tower or tiny.safeclip), "--device", "cpu"]


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_export_round_trip_with_plain_transformers(tiny, images, tmp_path, family, capsys):
    safe = load_tiny(tiny, family)
    target = export(safe, tmp_path / "merged", dtype="float32")
    model = CLASSES[family].from_pretrained(target)
    processor = AutoProcessor.from_pretrained(target)
    # The original conversation format, as a chat template that renders what safellava renders.
    assert processor.chat_template == CHAT_TEMPLATES[safe.prompt_format]
    turns = single_turn("Describe this image.")
    rendered = processor.apply_chat_template(
        to_chat_messages(turns), add_generation_prompt=True, tokenize=False
    )
    assert rendered == safe.engine.render(turns)
    expected = CLIPVisionModel.from_pretrained(tiny.safeclip).state_dict()
    for key, tensor in model.model.vision_tower.state_dict().items():
        assert torch.equal(tensor, expected[key]), key
    flags = ["--model", str(target), "--vision-tower", "original", "--device", "cpu"]
    code = main(["caption", *map(str, images), *flags, "--max-new-tokens", str(MAX_NEW_TOKENS), "--json"])
    merged = [json.loads(line)["caption"] for line in capsys.readouterr().out.splitlines()]
    assert code == 0
    assert merged == safe.caption([str(p) for p in images])
    card = (target / "README.md").read_text()
    assert "CC BY-NC 4.0" in card and "2311.16254" in card and str(tiny.safeclip) in card
    provenance = json.loads((target / "safellava.json").read_text())
    assert provenance["model"] == str(getattr(tiny, family))
    assert provenance["vision_tower"] == str(tiny.safeclip)
    assert provenance["tower_fingerprint"].startswith("sha256:")


def test_export_cli_is_half_precision_and_matches_info_fingerprint(tiny, tmp_path, capsys):
    target = tmp_path / "half"
    flags = ["--model", str(tiny.llava), "--vision-tower", str(tiny.safeclip), "--device", "cpu"]
    assert main(["export", str(target), *flags]) == 0
    from safetensors import safe_open

    with safe_open(target / "model.safetensors", "pt") as weights:
        assert {weights.get_slice(k).get_dtype() for k in weights.keys()} == {"F16"}  # noqa: SIM118
    assert main(["info", *flags, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (
        json.loads((target / "safellava.json").read_text())["tower_fingerprint"]
        == report["vision_tower"]["fingerprint"]
    )


def test_export_refusals(tiny, tmp_path, capsys):
    flags = ["--model", str(tiny.llava), "--vision-tower", str(tiny.safeclip), "--device", "cpu"]
    assert main(["export", str(tmp_path / "q"), *flags, "--quantize", "4bit"]) == 2
    assert "cannot export a 4bit-quantized model" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    for force in ([], ["--force"]):  # a folder of someone's files is never replaced, --force or not
        assert main(["export", str(busy), *flags, *force]) == 2
        assert "is not empty and not an earlier export" in capsys.readouterr().err
        assert (busy / "keep.txt").read_text() == "mine"
    earlier = tmp_path / "earlier"
    assert main(["export", str(earlier), *flags]) == 0
    assert main(["export", str(earlier), *flags]) == 2
    assert "holds an earlier export: pass --force" in capsys.readouterr().err
    assert main(["export", str(earlier), *flags, "--force"]) == 0
    assert (earlier / "model.safetensors").exists()
    with pytest.raises(UsageError, match="quantized"):
        export(load_tiny(tiny, quantize="8bit"), tmp_path / "q8")


def test_interrupted_export_leaves_nothing(tiny, tmp_path, monkeypatch):
    safe = load_tiny(tiny)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(export_module, "model_card", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export(safe, tmp_path / "merged")
    assert list(tmp_path.iterdir()) == []


def test_export_never_replaces_a_folder_holding_its_sources_or_the_cwd(tiny, tmp_path, monkeypatch, capsys):
    assert main(["export", str(tiny.llava.parent), *_flags(tiny), "--force"]) == 2
    assert "which --force would delete" in capsys.readouterr().err
    assert (tiny.llava / "config.json").exists()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.txt").write_text("keep")
    assert main(["export", ".", *_flags(tiny), "--force"]) == 2
    assert "the current folder" in capsys.readouterr().err
    assert (tmp_path / "mine.txt").read_text() == "keep"


def test_exports_get_ordinary_permissions(tiny, tmp_path):
    out = export(load_tiny(tiny), tmp_path / "merged")
    assert stat.S_IMODE(out.stat().st_mode) == ordinary_mode(directory=True)
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {ordinary_mode()}
    assert os.access(out / "model.safetensors", os.R_OK)


def llava_hf_keys(vision_layers: int, text_layers: int, next_family: bool) -> set[str]:
    """The weight names of a llava-hf hub checkpoint (llava-hf/llava-1.5-7b-hf, llava-v1.6-*-hf),
    written out from the hub's naming: the layout engines such as vLLM load."""
    tower = {
        "vision_tower.vision_model.embeddings.class_embedding",
        "vision_tower.vision_model.embeddings.patch_embedding.weight",
        "vision_tower.vision_model.embeddings.position_embedding.weight",
        "vision_tower.vision_model.pre_layrnorm.weight",
        "vision_tower.vision_model.pre_layrnorm.bias",
        "vision_tower.vision_model.post_layernorm.weight",
        "vision_tower.vision_model.post_layernorm.bias",
    }
    for i in range(vision_layers):
        for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                     "layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2"):  # fmt: skip
            tower |= {f"vision_tower.vision_model.encoder.layers.{i}.{part}.{p}" for p in ("weight", "bias")}
    projector = {f"multi_modal_projector.linear_{n}.{p}" for n in (1, 2) for p in ("weight", "bias")}
    language = {"language_model.model.embed_tokens.weight", "language_model.model.norm.weight",
                "language_model.lm_head.weight"}  # fmt: skip
    for i in range(text_layers):
        for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm",
                     "post_attention_layernorm"):  # fmt: skip
            language.add(f"language_model.model.layers.{i}.{part}.weight")
    return tower | projector | language | ({"image_newline"} if next_family else set())


def _exported_keys(folder) -> dict[str, str]:
    from safetensors import safe_open

    keys = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, "pt") as weights:
            keys.update({key: file.name for key in weights.keys()})  # noqa: SIM118
    return keys


@pytest.mark.parametrize("family", ["llava", "llava_next"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_export_writes_exactly_the_llava_hf_hub_layout(tiny, tmp_path, family, dtype):
    from make_tiny_checkpoints import TINY_TEXT, TINY_VISION
    from safetensors import safe_open

    target = export(load_tiny(tiny, family), tmp_path / "merged", dtype=dtype)
    keys = _exported_keys(target)
    expected = llava_hf_keys(
        TINY_VISION["num_hidden_layers"], TINY_TEXT["num_hidden_layers"], family == "llava_next"
    )
    assert set(keys) == expected
    stored = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}[dtype]
    with safe_open(target / "model.safetensors", "pt") as weights:
        assert {weights.get_slice(k).get_dtype() for k in weights.keys()} == {stored}  # noqa: SIM118
        assert weights.metadata() == {"format": "pt"}
    files = {path.name for path in target.iterdir()}
    assert {"config.json", "generation_config.json", "processor_config.json", "preprocessor_config.json",
            "chat_template.json", "tokenizer_config.json", "README.md", "safellava.json"} <= files  # fmt: skip
    config = json.loads((target / "config.json").read_text())
    assert config["architectures"] == [CLASSES[family].__name__]
    assert config["model_type"] == family and config["dtype"] == dtype
    preprocessor = json.loads((target / "preprocessor_config.json").read_text())
    assert preprocessor["crop_size"] == {
        "height": TINY_VISION["image_size"],
        "width": TINY_VISION["image_size"],
    }


def test_a_large_export_is_sharded_with_an_index_and_loads(tiny, images, tmp_path):
    safe = load_tiny(tiny)
    target = export(safe, tmp_path / "sharded", dtype="float32", max_shard_size=200_000)
    shards = sorted(path.name for path in target.glob("*.safetensors"))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((target / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == _exported_keys(target)
    assert index["metadata"]["total_size"] == 4 * sum(p.numel() for p in safe.model.state_dict().values())
    model = LlavaForConditionalGeneration.from_pretrained(target)
    for key, tensor in safe.model.state_dict().items():
        assert torch.equal(model.state_dict()[key], tensor), key


def test_an_export_run_with_its_own_tower_says_what_that_tower_is(tiny, images, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    target = export(load_tiny(tiny), tmp_path / "merged")
    flags = ["--model", str(target), "--vision-tower", "original", "--device", "cpu", "--max-new-tokens", "3"]
    assert main(["caption", str(images[0]), *flags]) == 0
    err = capsys.readouterr().err
    assert "original CLIP vision tower, not Safe-CLIP" not in err
    assert f"{target} is a safellava export: its tower is {tiny.safeclip} (Safe-CLIP), baked in" in err
    assert "verified" in err and len(err.splitlines()) == 1
    # Tower weights changed after the export: the notice says so instead of vouching for them.
    weights = target / "model.safetensors"
    state = load_file(weights)
    state["vision_tower.vision_model.post_layernorm.bias"] += 1
    save_file(state, weights, metadata={"format": "pt"})
    assert main(["caption", str(images[0]), *flags]) == 0
    assert "fingerprint mismatch" in capsys.readouterr().err


def test_an_export_made_with_the_checkpoint_template_keeps_it(tiny, tmp_path):
    safe = load_tiny(tiny, prompt_format="checkpoint")
    target = export(safe, tmp_path / "merged")
    assert AutoProcessor.from_pretrained(target).chat_template == safe.processor.chat_template
