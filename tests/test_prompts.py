"""Prompts byte for byte as the original LLaVA code renders them, and the format each model gets.

The golden strings in ``golden/llava_prompts.json`` were rendered by the original
``llava/conversation.py`` (llava-torch 1.2.2.post1) with ``scripts/render_llava_golden.py``, not by
safellava.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from safellava.cli import main
from safellava.config import ModelOptions, load_preset, resolve_options
from safellava.errors import UsageError
from safellava.families import LLAVA, LLAVA_NEXT
from safellava.prompts import ORIGINAL_FORMATS, Turn, canonical_format, render_prompt, single_turn

GOLDEN = json.loads((Path(__file__).parent / "golden" / "llava_prompts.json").read_text())
PROMPTS = GOLDEN["prompts"]
Q = "Describe this image."
CUSTOM = "You are a careful assistant."


def test_the_golden_file_covers_every_original_format():
    assert sorted(PROMPTS) == sorted(ORIGINAL_FORMATS)
    assert GOLDEN["meta"]["source_file"] == "llava/conversation.py"


@pytest.mark.parametrize("name", ORIGINAL_FORMATS)
def test_single_turn_as_the_original(name):
    assert render_prompt(None, single_turn(Q), name) == PROMPTS[name]["single_turn"]
    caption = "Provide a one-sentence caption for the provided image."
    assert render_prompt(None, single_turn(caption), name) == PROMPTS[name]["single_turn_caption"]


@pytest.mark.parametrize("name", ORIGINAL_FORMATS)
def test_a_custom_system_prompt_replaces_the_default_as_the_original(name):
    # chatml_direct's system template carries its own "<|im_start|>system\n" header; --system
    # replaces the line after it (the golden case the original renders with that header kept).
    case = "custom_system_with_header" if name == "chatml_direct" else "custom_system"
    assert render_prompt(None, single_turn(Q, system=CUSTOM), name) == PROMPTS[name][case]


@pytest.mark.parametrize("name", [n for n in ORIGINAL_FORMATS if n != "chatml_direct"])
def test_an_empty_system_prompt_as_the_original(name):
    assert render_prompt(None, single_turn(Q, system=""), name) == PROMPTS[name]["empty_system"]


@pytest.mark.parametrize("name", ORIGINAL_FORMATS)
def test_two_turns_with_the_answer_stored_as_the_original(name):
    turns = [
        Turn("user", Q, image=True),
        Turn("assistant", "A cat on a mat."),
        Turn("user", "What colour is the cat?"),
    ]
    assert render_prompt(None, turns, name) == PROMPTS[name]["two_turn"]


def test_checkpoint_uses_the_chat_template_and_originals_ignore_it(safe_llava, safe_next):
    turns = single_turn(Q)
    assert render_prompt(safe_llava.processor, turns, "checkpoint") == f"USER: <image>\n{Q} ASSISTANT:"
    assert render_prompt(safe_next.processor, turns, "checkpoint") == f"[INST] <image>\n{Q} [/INST]"
    assert render_prompt(safe_next.processor, turns, "llava_v1") == PROMPTS["llava_v1"]["single_turn"]


def test_checkpoint_without_a_chat_template_is_bad_usage(safe_llava, monkeypatch):
    monkeypatch.setattr(safe_llava.processor, "chat_template", None)
    with pytest.raises(UsageError, match="has no chat template"):
        render_prompt(safe_llava.processor, single_turn(Q), "checkpoint")


@pytest.mark.parametrize(
    ("old", "new"), [("vicuna", "llava_v1"), ("mistral", "mistral_instruct"), ("chatml", "chatml_direct")]
)
def test_old_names_are_aliases_of_the_same_formats(old, new):
    assert canonical_format(old) == new
    assert ModelOptions(prompt_format=old).prompt_format == new


def test_a_name_that_meant_something_else_says_what_to_use():
    with pytest.raises(UsageError, match="'llava' is gone: use llava_v1"):
        canonical_format("llava")
    with pytest.raises(UsageError, match="unknown prompt format 'alpaca'"):
        canonical_format("alpaca")


PRESET_FORMATS = {
    "llava-1.5-7b": "llava_v1",
    "llava-1.5-13b": "llava_v1",
    "llava-1.6-mistral-7b": "mistral_instruct",
    "llava-1.6-vicuna-7b": "llava_v1",
    "llava-1.6-vicuna-13b": "llava_v1",
    "llava-1.6-34b": "chatml_direct",
}


@pytest.mark.parametrize(("preset", "expected"), sorted(PRESET_FORMATS.items()))
def test_every_preset_names_its_original_format(preset, expected):
    assert load_preset(preset).model.prompt_format == expected
    assert (
        resolve_options(preset, prompt_format="checkpoint")[0].prompt_format == "checkpoint"
    )  # the flag wins


class _Vocab:
    def __init__(self, *tokens):
        self.tokens = tokens

    def get_vocab(self):
        return {token: i for i, token in enumerate(self.tokens)}


@pytest.mark.parametrize(
    ("family", "language_model", "vocab", "expected"),
    [
        (LLAVA, "llama", (), "llava_v1"),
        (LLAVA_NEXT, "llama", (), "llava_v1"),  # 1.6 Vicuna
        (LLAVA_NEXT, "mistral", (), "mistral_instruct"),
        (LLAVA_NEXT, "llama", ("<|im_start|>", "<|im_end|>"), "chatml_direct"),  # 1.6 34B (Yi)
    ],
)
def test_auto_picks_the_original_format_from_the_checkpoint(family, language_model, vocab, expected):
    config = SimpleNamespace(model_type=family.name, text_config=SimpleNamespace(model_type=language_model))
    assert family.default_format(config, _Vocab(*vocab)) == expected


def test_auto_on_the_tiny_checkpoints(safe_llava, safe_next):
    assert safe_llava.prompt_format == "llava_v1"
    assert safe_next.prompt_format == "mistral_instruct"


@pytest.mark.parametrize(
    ("family", "flags", "expected"),
    [
        ("llava", [], PROMPTS["llava_v1"]["single_turn"]),
        ("llava_next", [], PROMPTS["mistral_instruct"]["single_turn"]),
        ("llava_next", ["--system", CUSTOM], PROMPTS["mistral_instruct"]["custom_system"]),
        ("llava", ["--prompt-format", "checkpoint"], f"USER: <image>\n{Q} ASSISTANT:"),
    ],
)
def test_show_prompt_writes_the_exact_text_as_json(tiny, images, capsys, family, flags, expected):
    model = ["--model", str(getattr(tiny, family)), "--vision-tower", str(tiny.safeclip), "--device", "cpu"]
    code = main(
        ["caption", str(images[0]), *model, "--max-new-tokens", "2", "--prompt", Q, "--show-prompt", *flags]
    )
    out, err = capsys.readouterr()
    assert code == 0 and out.strip()
    [line] = [line for line in err.splitlines() if line.startswith("prompt: ")]
    assert json.loads(line.removeprefix("prompt: ")) == expected


def test_show_prompt_in_chat_shows_every_turn(tiny, images, capsys, monkeypatch):
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{Q}\nWhat colour is the cat?\n"))
    model = ["--model", str(tiny.llava), "--vision-tower", str(tiny.safeclip), "--device", "cpu"]
    assert main(["chat", str(images[0]), *model, "--max-new-tokens", "4", "--show-prompt"]) == 0
    out, err = capsys.readouterr()
    prompts = [
        json.loads(line.removeprefix("prompt: ")) for line in err.splitlines() if line.startswith("prompt: ")
    ]
    first_answer = out.splitlines()[0]
    assert prompts[0] == PROMPTS["llava_v1"]["single_turn"]
    assert prompts[1] == (
        PROMPTS["llava_v1"]["single_turn"] + f" {first_answer}</s>USER: What colour is the cat? ASSISTANT:"
    )


@pytest.mark.parametrize("name", ORIGINAL_FORMATS)
def test_the_image_placeholder_in_a_text_is_refused(name):
    with pytest.raises(UsageError, match="contains <image>, which stands for the image"):
        render_prompt(None, single_turn("What does <image> mean?"), name)
