"""Multi-turn conversation state about one image, independent of any terminal."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .config import GenerationOptions
from .errors import SafeLlavaError, UsageError, output_error
from .generate import StreamingAnswer
from .images import ImageSource, load_image, source_name
from .model import SafeLlava
from .prompts import Turn
from .writers import atomic_write_text


class ContextOverflowError(SafeLlavaError):
    """Even the image turn and the new question alone do not fit the model's context."""


@dataclass
class ChatSession:
    """A conversation: the image, the turns so far, and how to ask the next question."""

    loaded: SafeLlava
    options: GenerationOptions
    context_tokens: int = 0  # prompt + answer budget; 0 means the model's own context length
    image: Any = None  # the RGB image the conversation is about, or None for text only
    image_name: str | None = None
    turns: list[Turn] = field(default_factory=list)  # user and assistant turns, oldest first
    dropped_turns: int = 0  # turns removed so far to fit the context
    on_prompt: Callable[[str], None] | None = None  # receives each prompt text before it is answered

    def __post_init__(self) -> None:
        if not self.context_tokens:
            self.context_tokens = self.loaded.engine.context_length

    def set_image(self, source: ImageSource, name: str | None = None) -> None:
        """Open a new image (``ImageError`` if it cannot be read) and start a new conversation."""
        self.image = load_image(source)
        self.image_name = name or source_name(source)
        self.reset()

    def reset(self) -> None:
        """Forget the conversation, keep the image."""
        self.turns = []
        self.dropped_turns = 0

    def _conversation(self, question: str) -> list[Turn]:
        system = [Turn("system", self.options.system)] if self.options.system is not None else []
        first_user = not any(turn.role == "user" for turn in self.turns)
        new = Turn("user", question, image=self.image is not None and first_user)
        return [*system, *self.turns, new]

    def _fit_context(self, question: str) -> tuple[str, Any]:
        """The prompt and model inputs for ``question``, dropping the oldest exchanges (never the image turn) to fit."""
        # Room kept for the answer: max_new_tokens, but never more than half the context (a longer
        # answer is capped by the engine rather than leaving no room for the conversation).
        budget = self.context_tokens - min(self.options.max_new_tokens, self.context_tokens // 2)
        images = [self.image] if self.image is not None else []
        while True:
            prompt = self.loaded.engine.render(self._conversation(question))
            inputs = self.loaded.engine.prepare(images, [prompt])
            if inputs["input_ids"].shape[1] <= budget:
                return prompt, inputs
            # Keep the first exchange (it carries the image); drop the next oldest one.
            keep = 2 if self.turns and self.turns[0].image else 0
            if len(self.turns) <= keep:
                raise ContextOverflowError(
                    f"the question does not fit the model's context of {self.context_tokens} tokens "
                    f"with {self.options.max_new_tokens} new tokens: ask something shorter or /reset"
                )
            del self.turns[keep : keep + 2]
            self.dropped_turns += 2

    def ask(self, question: str) -> StreamingAnswer:
        """Start answering ``question``; the exchange joins the history once the answer ends."""
        if not question.strip():
            raise UsageError("empty question")
        prompt, inputs = self._fit_context(question)
        if self.on_prompt is not None:
            self.on_prompt(prompt)
        user = self._conversation(question)[-1]

        def record(answer_text: str) -> None:
            self.turns.extend([user, Turn("assistant", answer_text)])

        return self.loaded.engine.stream(inputs, self.options, on_finish=record)

    def transcript(self) -> dict[str, Any]:
        """Everything needed to read the conversation back: model, tower, image and turns."""
        return {
            **asdict(self.loaded.provenance),
            "image": self.image_name,
            "system": self.options.system,
            "saved_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "turns": [{"role": turn.role, "text": turn.text} for turn in self.turns],
        }

    def save(self, path: str | Path) -> Path:
        """Write the transcript as JSON, or as Markdown when ``path`` ends in .md.

        Only a new file or an earlier transcript is written: anything else there is refused untouched.
        """
        target = Path(path)
        if not target.parent.is_dir():
            raise UsageError(f"cannot save to {target}: folder {target.parent} does not exist")
        if (target.exists() or target.is_symlink()) and not is_transcript(target):
            raise UsageError(
                f"cannot save to {target}: it exists and is not a safellava transcript (nothing was changed): "
                "choose another name"
            )
        data = self.transcript()
        markdown = target.suffix.lower() in (".md", ".markdown")
        text = (
            transcript_markdown(data) if markdown else json.dumps(data, ensure_ascii=False, indent=2) + "\n"
        )
        try:
            return atomic_write_text(target, text)
        except OSError as exc:
            raise output_error(target, exc) from None


MARKDOWN_TITLE = "# safellava chat\n"
TRANSCRIPT_KEYS = {"model", "vision_tower", "saved_at", "turns"}


def is_transcript(path: Path) -> bool:
    """Whether a file is a transcript that ``save`` wrote (JSON or Markdown); read no more than needed."""
    if path.is_symlink() or not path.is_file():
        return False
    with open(path, "rb") as file:
        head = file.read(len(MARKDOWN_TITLE))
        if head == MARKDOWN_TITLE.encode():
            return True
        if path.stat().st_size > 64 * 2**20:  # no transcript of ours is that long
            return False
        try:
            data = json.loads(head + file.read())
        except ValueError:
            return False
    return isinstance(data, dict) and set(data) >= TRANSCRIPT_KEYS


def transcript_markdown(data: dict[str, Any]) -> str:
    """A transcript as Markdown: the header fields, then each turn."""
    lines = ["# safellava chat", ""]
    for key in ("model", "vision_tower", "image", "system", "saved_at"):
        if data.get(key):
            lines.append(f"- {key.replace('_', ' ')}: {data[key]}")
    for turn in data["turns"]:
        lines += ["", f"**{turn['role'].capitalize()}:** {turn['text']}"]
    return "\n".join(lines) + "\n"
