"""Errors a user can cause, each carrying the one line the CLI prints and its exit code."""

from __future__ import annotations

MAX_MESSAGE_CHARS = 500  # an error line stays readable whatever text a library put in an exception


class SafeLlavaError(Exception):
    """Base class: the message is one line that names the thing and what to do."""

    exit_code = 1


class UsageError(SafeLlavaError):
    """A bad flag, preset or option value."""

    exit_code = 2


class ModelLoadError(SafeLlavaError):
    """The LLaVA checkpoint, its processor or the vision tower cannot be loaded."""

    exit_code = 2


class IncompatibleTowerError(ModelLoadError):
    """The vision tower does not fit the LLaVA's projector or image processor."""


class ImageError(SafeLlavaError):
    """One image cannot be read; the others go on."""

    def __init__(self, source: str, reason: str):
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason


class OutOfMemoryError(SafeLlavaError):
    """Generation ran out of accelerator memory even for a single image."""


def first_line(exc: BaseException, limit: int = MAX_MESSAGE_CHARS) -> str:
    """The first non-empty line of an exception's text (or its type name), at most ``limit`` characters."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= limit else f"{text[: limit - 1]}…"
