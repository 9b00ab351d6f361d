"""Conversation -> prompt text: the checkpoint's chat template, else the family's built-in format."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .errors import UsageError

IMAGE_TOKEN = "<image>"
VICUNA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
CHATML_SYSTEM = "Answer the questions."


@dataclass(frozen=True)
class Turn:
    """One message of a conversation; ``image`` marks the turn that carries the image."""

    role: str  # "system", "user" or "assistant"
    text: str
    image: bool = False


def single_turn(prompt: str, system: str | None = None) -> list[Turn]:
    """The conversation for captioning one image: an optional system line, one user turn."""
    turns = [Turn("system", system)] if system else []
    return [*turns, Turn("user", prompt, image=True)]


def to_chat_messages(turns: Sequence[Turn]) -> list[dict[str, Any]]:
    """Turns in the message format that transformers chat templates take."""
    messages = []
    for turn in turns:
        content: list[dict[str, str]] = [{"type": "image"}] if turn.image else []
        content.append({"type": "text", "text": turn.text})
        messages.append({"role": turn.role, "content": content})
    return messages


def _split_system(turns: Sequence[Turn], default: str | None) -> tuple[str | None, list[Turn]]:
    system = next((t.text for t in turns if t.role == "system"), default)
    return system, [t for t in turns if t.role != "system"]


def _with_image(turn: Turn) -> str:
    return f"{IMAGE_TOKEN}\n{turn.text}" if turn.image else turn.text


def _vicuna_style(turns: Sequence[Turn], default_system: str | None) -> str:
    system, rest = _split_system(turns, default_system)
    parts = [f"{system} "] if system else []
    for turn in rest:
        if turn.role == "user":
            parts.append(f"USER: {_with_image(turn)} ")
        else:
            parts.append(f"ASSISTANT: {turn.text}</s>")
    parts.append("ASSISTANT:")
    return "".join(parts)


def _mistral(turns: Sequence[Turn]) -> str:
    system, rest = _split_system(turns, None)
    parts = []
    for index, turn in enumerate(rest):
        if turn.role == "user":
            text = _with_image(turn)
            if system and index == 0:
                text = f"{system}\n\n{text}"
            parts.append(f"[INST] {text} [/INST]")
        else:
            parts.append(f" {turn.text}</s>")
    return "".join(parts)


def _chatml(turns: Sequence[Turn]) -> str:
    system, rest = _split_system(turns, CHATML_SYSTEM)
    parts = [f"<|im_start|>system\n{system}<|im_end|>"] if system else []
    for turn in rest:
        parts.append(f"<|im_start|>{turn.role}\n{_with_image(turn)}<|im_end|>")
    parts.append("<|im_start|>assistant\n")
    return "".join(parts)


def format_builtin(turns: Sequence[Turn], prompt_format: str) -> str:
    """Prompt text in a family's built-in format, ending where the assistant's answer begins."""
    if prompt_format == "llava":
        return _vicuna_style(turns, None)
    if prompt_format == "vicuna":
        return _vicuna_style(turns, VICUNA_SYSTEM)
    if prompt_format == "mistral":
        return _mistral(turns)
    if prompt_format == "chatml":
        return _chatml(turns)
    raise UsageError(f"unknown prompt format {prompt_format!r}")


def render_prompt(processor: Any, turns: Sequence[Turn], prompt_format: str) -> str:
    """Prompt text for ``turns``: the processor's chat template where it has one, else built-in."""
    if getattr(processor, "chat_template", None):
        return processor.apply_chat_template(
            to_chat_messages(turns), add_generation_prompt=True, tokenize=False
        )
    return format_builtin(turns, prompt_format)
