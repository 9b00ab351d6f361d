"""Conversation -> prompt text, byte for byte as the original LLaVA code renders it.

One function per conversation mode of haotian-liu/LLaVA ``llava/conversation.py`` (the templates the
models were trained and evaluated with): ``llava_v1`` (separator style TWO), ``mistral_instruct`` and
``llava_llama_2`` (LLAMA_2), ``chatml_direct`` (MPT). As in the original, the image placeholder goes
at the start of the first user message (``<image>\\n`` + text), an earlier answer is followed by its
separator, and the text ends where the assistant's answer begins. ``checkpoint`` uses the checkpoint's
own chat template instead (opt-in: the llava-hf templates differ from the originals).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import UsageError

IMAGE_TOKEN = "<image>"
LLAVA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
LLAMA_2_SYSTEM = (
    "You are a helpful language and vision assistant. "
    "You are able to understand the visual content that the user provides, "
    "and assist the user with a variety of tasks using natural language."
)
CHATML_SYSTEM = "Answer the questions."

CHECKPOINT = "checkpoint"  # the checkpoint's own chat template
AUTO = "auto"  # the family's original format (see families.py)
ORIGINAL_FORMATS = ("llava_v1", "mistral_instruct", "chatml_direct", "llava_llama_2")
PROMPT_FORMATS = (AUTO, *ORIGINAL_FORMATS, CHECKPOINT)
# Earlier names of the same formats.
ALIASES = {"vicuna": "llava_v1", "mistral": "mistral_instruct", "chatml": "chatml_direct"}
RENAMED = {"llava": "llava_v1 (LLaVA's own, with its system line) or checkpoint (the checkpoint's template)"}


@dataclass(frozen=True)
class Turn:
    """One message of a conversation; ``image`` marks the turn that carries the image."""

    role: str  # "system", "user" or "assistant"
    text: str
    image: bool = False


def single_turn(prompt: str, system: str | None = None) -> list[Turn]:
    """The conversation for captioning one image: a system prompt when one is given, one user turn."""
    turns = [Turn("system", system)] if system is not None else []
    return [*turns, Turn("user", prompt, image=True)]


def canonical_format(name: str) -> str:
    """The format a name stands for (old names are aliases); a ``UsageError`` for unknown ones."""
    name = ALIASES.get(name, name)
    if name in RENAMED:
        raise UsageError(f"prompt format {name!r} is gone: use {RENAMED[name]}")
    if name not in PROMPT_FORMATS:
        raise UsageError(f"unknown prompt format {name!r}: use one of {', '.join(PROMPT_FORMATS)}")
    return name


def _messages(turns: Sequence[Turn], default_system: str) -> tuple[str, list[tuple[str, str]]]:
    """The system prompt (the mode's default unless a system turn gives one) and (role, text) messages."""
    system = next((t.text for t in turns if t.role == "system"), default_system)
    messages = [
        (turn.role, f"{IMAGE_TOKEN}\n{turn.text}" if turn.image else turn.text)
        for turn in turns
        if turn.role != "system"
    ]
    return system, messages


def llava_v1(turns: Sequence[Turn]) -> str:
    """``conv_llava_v1`` (separator style TWO): ``{system} USER: {q} ASSISTANT: {a}</s>USER: ... ASSISTANT:``."""
    system, messages = _messages(turns, LLAVA_V1_SYSTEM)
    text = f"{system} "
    for role, message in messages:
        text += f"USER: {message} " if role == "user" else f"ASSISTANT: {message}</s>"
    return text + "ASSISTANT:"


def _llama_2(turns: Sequence[Turn], default_system: str, sep: str) -> str:
    """Separator style LLAMA_2: the system inside the first ``[INST]``, answers followed by `` </s>``."""
    system, messages = _messages(turns, default_system)
    text = ""
    for index, (role, message) in enumerate(messages):
        if index == 0 and system:
            message = f"<<SYS>>\n{system}\n<</SYS>>\n\n{message}"
        text += f"{sep}[INST] {message} [/INST]" if role == "user" else f" {message} </s>"
    return text.lstrip(sep) if sep else text  # as the original: characters of sep stripped from the left


def mistral_instruct(turns: Sequence[Turn]) -> str:
    """``conv_mistral_instruct``: ``[INST] {q} [/INST] {a} </s>[INST] ...`` (no system prompt by default)."""
    return _llama_2(turns, "", "")


def llava_llama_2(turns: Sequence[Turn]) -> str:
    """``conv_llava_llama_2``: LLaMA-2 chat with LLaVA's system prompt, ``</s><s>`` between turns."""
    return _llama_2(turns, LLAMA_2_SYSTEM, "<s>")


def chatml_direct(turns: Sequence[Turn]) -> str:
    """``conv_chatml_direct`` (separator style MPT): ChatML turns with no newline between them."""
    system, messages = _messages(turns, CHATML_SYSTEM)
    text = f"<|im_start|>system\n{system}<|im_end|>"
    for role, message in messages:
        text += f"<|im_start|>{role}\n{message}<|im_end|>"
    return text + "<|im_start|>assistant\n"


RENDERERS: dict[str, Callable[[Sequence[Turn]], str]] = {
    "llava_v1": llava_v1,
    "mistral_instruct": mistral_instruct,
    "chatml_direct": chatml_direct,
    "llava_llama_2": llava_llama_2,
}


def to_chat_messages(turns: Sequence[Turn]) -> list[dict[str, Any]]:
    """Turns in the message format that transformers chat templates take."""
    messages = []
    for turn in turns:
        content: list[dict[str, str]] = [{"type": "image"}] if turn.image else []
        content.append({"type": "text", "text": turn.text})
        messages.append({"role": turn.role, "content": content})
    return messages


def render_prompt(processor: Any, turns: Sequence[Turn], prompt_format: str) -> str:
    """Prompt text for ``turns`` in an original format, or through the checkpoint's chat template."""
    if any(IMAGE_TOKEN in turn.text for turn in turns):
        # It would be taken for the image's place: the model would see a second, missing image.
        raise UsageError(f"the text contains {IMAGE_TOKEN}, which stands for the image: leave it out")
    if prompt_format == CHECKPOINT:
        if not getattr(processor, "chat_template", None):
            raise UsageError(
                "this checkpoint has no chat template: use --prompt-format auto or an original format"
            )
        return processor.apply_chat_template(
            to_chat_messages(turns), add_generation_prompt=True, tokenize=False
        )
    renderer = RENDERERS.get(prompt_format)
    if renderer is None:
        raise UsageError(f"unknown prompt format {prompt_format!r}: use one of {', '.join(PROMPT_FORMATS)}")
    return renderer(turns)
