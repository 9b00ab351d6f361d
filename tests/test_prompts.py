"""Exact prompt strings for every family, and the chat template winning where there is one."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from safellava.errors import UsageError
from safellava.families import LLAVA, LLAVA_NEXT
from safellava.prompts import Turn, format_builtin, render_prompt, single_turn

Q = "What is happening here?"
VICUNA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)

SINGLE_TURN = {
    "llava": f"USER: <image>\n{Q} ASSISTANT:",
    "mistral": f"[INST] <image>\n{Q} [/INST]",
    "vicuna": f"{VICUNA_SYSTEM} USER: <image>\n{Q} ASSISTANT:",
    "chatml": (
        "<|im_start|>system\nAnswer the questions.<|im_end|>"
        f"<|im_start|>user\n<image>\n{Q}<|im_end|><|im_start|>assistant\n"
    ),
}


@pytest.mark.parametrize("prompt_format", sorted(SINGLE_TURN))
def test_single_turn_prompt_per_family(prompt_format):
    assert format_builtin(single_turn(Q), prompt_format) == SINGLE_TURN[prompt_format]


MULTI = [
    Turn("user", "Q1", image=True),
    Turn("assistant", "A1"),
    Turn("user", "Q2"),
]
MULTI_TURN = {
    "llava": "USER: <image>\nQ1 ASSISTANT: A1</s>USER: Q2 ASSISTANT:",
    "mistral": "[INST] <image>\nQ1 [/INST] A1</s>[INST] Q2 [/INST]",
    "vicuna": f"{VICUNA_SYSTEM} USER: <image>\nQ1 ASSISTANT: A1</s>USER: Q2 ASSISTANT:",
    "chatml": (
        "<|im_start|>system\nAnswer the questions.<|im_end|>"
        "<|im_start|>user\n<image>\nQ1<|im_end|><|im_start|>assistant\nA1<|im_end|>"
        "<|im_start|>user\nQ2<|im_end|><|im_start|>assistant\n"
    ),
}


@pytest.mark.parametrize("prompt_format", sorted(MULTI_TURN))
def test_multi_turn_prompt_per_family(prompt_format):
    assert format_builtin(MULTI, prompt_format) == MULTI_TURN[prompt_format]


SYSTEM_TURN = {
    "llava": f"Be brief. USER: <image>\n{Q} ASSISTANT:",
    "vicuna": f"Be brief. USER: <image>\n{Q} ASSISTANT:",
    "mistral": f"[INST] Be brief.\n\n<image>\n{Q} [/INST]",
    "chatml": (
        "<|im_start|>system\nBe brief.<|im_end|>"
        f"<|im_start|>user\n<image>\n{Q}<|im_end|><|im_start|>assistant\n"
    ),
}


@pytest.mark.parametrize("prompt_format", sorted(SYSTEM_TURN))
def test_system_prompt_replaces_the_default(prompt_format):
    assert format_builtin(single_turn(Q, system="Be brief."), prompt_format) == SYSTEM_TURN[prompt_format]


def test_unknown_format_is_a_usage_error():
    with pytest.raises(UsageError, match="unknown prompt format 'alpaca'"):
        format_builtin(single_turn(Q), "alpaca")


def test_checkpoint_chat_template_wins_over_builtin(safe_llava, safe_next):
    turns = single_turn(Q)
    assert render_prompt(safe_llava.processor, turns, "chatml") == f"USER: <image>\n{Q} ASSISTANT:"
    assert render_prompt(safe_next.processor, turns, "llava") == f"[INST] <image>\n{Q} [/INST]"


def test_builtin_format_used_without_chat_template(safe_llava, monkeypatch):
    monkeypatch.setattr(safe_llava.processor, "chat_template", None)
    assert render_prompt(safe_llava.processor, single_turn(Q), "mistral") == SINGLE_TURN["mistral"]


def test_detect_format_from_config_and_tokenizer(safe_llava, safe_next):
    assert LLAVA.default_format(safe_llava.model.config, safe_llava.processor.tokenizer) == "llava"
    assert LLAVA_NEXT.default_format(safe_next.model.config, safe_next.processor.tokenizer) == "mistral"

    class ChatMLTokenizer:
        def get_vocab(self):
            return {"<|im_start|>": 7}

    assert LLAVA_NEXT.default_format(safe_next.model.config, ChatMLTokenizer()) == "chatml"
    vicuna_next = SimpleNamespace(model_type="llava_next", text_config=SimpleNamespace(model_type="llama"))
    assert LLAVA_NEXT.default_format(vicuna_next, safe_llava.processor.tokenizer) == "vicuna"
