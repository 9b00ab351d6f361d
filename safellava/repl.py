"""The chat loop: reads lines and writes answers through callbacks, so it runs without a terminal."""

from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import dataclass

from .chat import ChatSession
from .errors import SafeLlavaError

HELP = """commands:
  /image PATH   talk about another image (starts a new conversation)
  /reset        forget the conversation, keep the image
  /save PATH    save the transcript: JSON, or Markdown for a .md path
  /help         this list
  /quit, /exit  leave (Ctrl-D too; Ctrl-C stops an answer, or leaves at the prompt)"""

TRIMMED_NOTICE = (
    "the conversation outgrew the model's context: its oldest turns are being dropped "
    "(the image turn is kept)"
)


@dataclass
class ChatIO:
    """How the loop talks to the outside world."""

    read_line: Callable[[str], str | None]  # shows a prompt, returns a line or None at end of input
    write: Callable[[str], None]  # answer text, streamed
    error: Callable[[str], None]  # one line about something that went wrong
    notice: Callable[[str], None]  # one informational line
    interactive: bool  # a person at a terminal: prompt and banner shown


def _argument(text: str) -> str:
    """A command's argument, with shell-style quotes removed when it has them."""
    text = text.strip()
    if text[:1] in ("'", '"'):
        try:
            parts = shlex.split(text)
        except ValueError:  # an unclosed quote: take the text as it is
            return text
        return parts[0] if len(parts) == 1 else text
    return text


class ChatLoop:
    """Runs commands and questions against a ``ChatSession`` until the input ends or /quit."""

    def __init__(self, session: ChatSession, io: ChatIO):
        self.session = session
        self.io = io
        self.failures = 0
        self._told_about_trimming = False

    def _fail(self, message: str) -> None:
        self.failures += 1
        self.io.error(message)

    def run(self) -> int:
        """Loop over the input; returns the number of failed commands and questions."""
        while True:
            try:
                line = self.io.read_line("> " if self.io.interactive else "")
            except KeyboardInterrupt:
                if self.io.interactive:
                    self.io.write("\n")
                break
            if line is None:
                break
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                if not self.command(line):
                    break
            else:
                self.answer(line)
        return self.failures

    def command(self, line: str) -> bool:
        """Run one /command; False means leave the loop."""
        name, _, rest = line.partition(" ")
        argument = _argument(rest)
        if name in ("/quit", "/exit"):
            return False
        if name == "/help":
            self.io.notice(HELP)
        elif name == "/reset":
            self.session.reset()
            self.io.notice("conversation cleared")
        elif name in ("/image", "/save") and not argument:
            self._fail(
                f"{name} needs a path, for example: {name} photo.{'jpg' if name == '/image' else 'json'}"
            )
        elif name == "/image":
            try:
                self.session.set_image(argument)
            except SafeLlavaError as exc:
                self._fail(str(exc))
            else:
                self.io.notice(f"new conversation about {self.session.image_name}")
        elif name == "/save":
            try:
                saved = self.session.save(argument)
            except (SafeLlavaError, OSError) as exc:
                self._fail(f"cannot save {argument}: {exc}" if isinstance(exc, OSError) else str(exc))
            else:
                self.io.notice(f"saved {saved}")
        else:
            self._fail(f"unknown command {name}: /help lists the commands")
        return True

    def answer(self, question: str) -> None:
        """Stream the answer to one question; Ctrl-C stops it and keeps what was said."""
        try:
            answer = self.session.ask(question)
        except SafeLlavaError as exc:
            self._fail(str(exc))
            return
        try:
            for chunk in answer:
                self.io.write(chunk)
        except KeyboardInterrupt:
            answer.stop()
            self.io.write("\n")
            self.io.notice("(answer stopped)")
        except SafeLlavaError as exc:
            self.io.write("\n")
            self._fail(str(exc))
        else:
            self.io.write("\n")
        if self.session.dropped_turns and not self._told_about_trimming:
            self._told_about_trimming = True
            self.io.notice(TRIMMED_NOTICE)
