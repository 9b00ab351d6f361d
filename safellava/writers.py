"""Output files written so that a crash or kill never leaves a half-written or duplicated record.

Sidecar captions are written to a temporary file and renamed into place. JSON Lines and CSV files
take whole records, one write and one fsync per batch; on opening, a record cut short by a kill is
cut off, and the records already there tell which images are done.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

RECORD_FIELDS = (
    "image",
    "caption",
    "prompt",
    "model",
    "vision_tower",
    "revision",
    "tower_revision",
    "quantize",
    "preset",
)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to a temporary file beside ``path``, then rename it into place."""
    target = Path(path)
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return target


class SidecarWriter:
    """One caption file per image, beside it or mirrored under an output folder."""

    extension = "txt"

    def __init__(self, root: Path, output: Path | None, caption_ext: str = ".txt"):
        self.root = root
        self.output = (output or root).resolve()
        self.caption_ext = caption_ext if caption_ext.startswith(".") else f".{caption_ext}"

    def target(self, image: str) -> Path:
        """Where the caption of ``image`` (a path relative to the input folder) goes."""
        target = (self.output / image).with_suffix(self.caption_ext)
        if not target.resolve().is_relative_to(self.output):
            raise ValueError(f"caption path {target} would fall outside {self.output}")
        return target

    def is_done(self, image: str) -> bool:
        """True when a non-empty caption file exists for ``image``."""
        target = self.target(image)
        return target.is_file() and target.stat().st_size > 0

    def reset(self) -> None:
        """Nothing to clear: with --overwrite each caption file is replaced as it is written."""

    def load(self, repair: bool = True) -> None:
        """Nothing to read: ``is_done`` looks for each caption file."""

    def write(self, records: Iterable[dict[str, Any]]) -> None:
        for record in records:
            target = self.target(record["image"])
            target.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(target, record["caption"] + "\n")

    def close(self) -> None:
        """Each caption file is complete once written: nothing to close."""


class _AppendWriter:
    """Records appended to one file, a batch per write; ``done`` from the records already there."""

    extension = ""

    def __init__(self, path: Path):
        self.path = path
        self._done: set[str] = set()
        self._file: Any = None

    def _complete_prefix(self, text: str) -> tuple[str, list[dict[str, Any]]]:
        raise NotImplementedError

    def _serialize(self, records: list[dict[str, Any]], new_file: bool) -> str:
        raise NotImplementedError

    def reset(self) -> None:
        """Start the file afresh (``--overwrite``)."""
        self.path.unlink(missing_ok=True)
        self._done = set()

    def load(self, repair: bool = True) -> None:
        """Read the records already written; ``repair`` cuts off a record left incomplete by a kill."""
        if not self.path.exists():
            return
        text = self.path.read_text(encoding="utf-8")
        kept, records = self._complete_prefix(text)
        if repair and kept != text:
            with open(self.path, "r+b") as file:
                file.truncate(len(kept.encode("utf-8")))
        self._done = {str(record.get("image")) for record in records}

    def is_done(self, image: str) -> bool:
        return image in self._done

    def write(self, records: Iterable[dict[str, Any]]) -> None:
        records = list(records)
        if not records:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new_file = not self.path.exists() or self.path.stat().st_size == 0
        if self._file is None:
            # Kept open across batches; closed by close().
            self._file = open(self.path, "a", encoding="utf-8", newline="")  # noqa: SIM115
        self._file.write(self._serialize(records, new_file))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._done.update(record["image"] for record in records)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class JsonlWriter(_AppendWriter):
    """One JSON object per line."""

    extension = "jsonl"

    def _complete_prefix(self, text: str) -> tuple[str, list[dict[str, Any]]]:
        records, kept = [], 0
        for line in text.splitlines(keepends=True):
            if not line.endswith("\n"):
                break
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break
            kept += len(line)
        return text[:kept], records

    def _serialize(self, records: list[dict[str, Any]], new_file: bool) -> str:
        return "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)


class CsvWriter(_AppendWriter):
    """A header row, then one row per record; captions with newlines are quoted."""

    extension = "csv"

    def __init__(self, path: Path, fields: tuple[str, ...] = RECORD_FIELDS):
        super().__init__(path)
        self.fields = fields

    def _complete_prefix(self, text: str) -> tuple[str, list[dict[str, Any]]]:
        # Cut at newlines, from the end, until what is left parses as whole rows of full width.
        candidate = text
        while candidate:
            if candidate.endswith("\n"):
                try:
                    rows = list(csv.reader(io.StringIO(candidate), strict=True))
                except csv.Error:
                    rows = None
                if rows and rows[0] == list(self.fields) and all(len(r) == len(self.fields) for r in rows):
                    return candidate, [dict(zip(self.fields, r, strict=True)) for r in rows[1:]]
            candidate = candidate[: candidate.rstrip("\n").rfind("\n") + 1]
        return "", []

    def _serialize(self, records: list[dict[str, Any]], new_file: bool) -> str:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=self.fields, extrasaction="ignore", lineterminator="\n")
        if new_file:
            writer.writeheader()
        writer.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in records)
        return buffer.getvalue()


def get_writer(fmt: str, root: Path, output: Path | None, caption_ext: str = ".txt") -> Any:
    """The writer for ``--format txt|jsonl|csv``; jsonl and csv need an output file."""
    if fmt == "txt":
        return SidecarWriter(root, output, caption_ext)
    if output is None:
        raise ValueError(f"--format {fmt} needs --output FILE")
    return JsonlWriter(output) if fmt == "jsonl" else CsvWriter(output)
