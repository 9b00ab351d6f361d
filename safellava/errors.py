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


class OutputError(SafeLlavaError):
    """An output file cannot be written (disk full, read-only folder); what was written before is kept."""


def output_error(path: object, exc: OSError, fix: str = "choose another output path") -> OutputError:
    """One line naming the file that cannot be written, why, and what to do."""
    import errno

    reason = exc.strerror or first_line(exc)
    if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return OutputError(f"cannot write {path}: {reason}: free some space, then rerun")
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return OutputError(f"cannot write {path}: {reason}: {fix} in a writable folder")
    return OutputError(f"cannot write {path}: {reason}: {fix}")


HUB_UNREACHABLE = (
    "the Hugging Face hub cannot be reached and {source} is not in its cache: connect and rerun, "
    "or set HF_HUB_OFFLINE=1 with the model cached, or pass a local folder (to try safellava without "
    "any download: python scripts/make_tiny_checkpoints.py /tmp/tiny)"
)


def load_failure(source: str, exc: BaseException) -> str:
    """Why a checkpoint could not be read, in one line; a hub that cannot be reached says what to do."""
    text = str(exc).lower()
    if "couldn't connect" in text or "offline mode" in text or "cannot reach" in text:
        return HUB_UNREACHABLE.format(source=source)
    return first_line(exc)
