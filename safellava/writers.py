"""Output files written so that a crash or kill never leaves a half-written or duplicated record.

Sidecar captions are written to a temporary file and renamed into place. JSON Lines and CSV files
take whole records, one write and one fsync per batch; on opening, a record cut short by a kill is
cut off, and the records already there tell which images are done.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import Any

from .errors import UsageError

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


@functools.cache
def _umask() -> int:
    # os.umask can only be read by setting it; done once, before any worker thread writes.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def ordinary_mode(directory: bool = False) -> int:
    """The mode a plain ``open``/``mkdir`` gives under the process umask (mkstemp/mkdtemp give 0600/0700)."""
    return (0o777 if directory else 0o666) & ~_umask()


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to a temporary file beside ``path``, then rename it into place."""
    target = Path(path)
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        mode = target.stat().st_mode & 0o777 if target.exists() else ordinary_mode()
        os.fchmod(handle, mode)
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
        self.output = Path(os.path.abspath(output or root))
        self.caption_ext = caption_ext if caption_ext.startswith(".") else f".{caption_ext}"

    def target(self, image: str) -> Path:
        """Where the caption of ``image`` (a path relative to the input folder) goes."""
        relative = PurePosixPath(image)
        if relative.is_absolute() or ".." in relative.parts:
            raise ValueError(f"caption path for {image} would fall outside {self.output}")
        return (self.output / relative).with_suffix(self.caption_ext)

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
        self._fresh = False

    def _scan(self, data: bytes) -> tuple[int, list[dict[str, Any]]]:
        """Bytes of whole records at the start of ``data``, and those records."""
        raise NotImplementedError

    def _serialize(self, records: list[dict[str, Any]], new_file: bool) -> str:
        raise NotImplementedError

    def reset(self) -> None:
        """Start afresh (``--overwrite``): the file is emptied at the first write, not before."""
        self._fresh = True
        self._done = set()

    def load(self, repair: bool = True) -> None:
        """Read the records already written; ``repair`` cuts off a record left incomplete by a kill."""
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        kept, records = self._scan(data)
        if repair and kept != len(data):
            with open(self.path, "r+b") as file:
                file.truncate(kept)
        self._done = {str(record.get("image")) for record in records}

    def is_done(self, image: str) -> bool:
        return image in self._done

    def write(self, records: Iterable[dict[str, Any]]) -> None:
        records = list(records)
        if not records:
            return
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Kept open across batches; closed by close().
            self._file = open(self.path, "w" if self._fresh else "a", encoding="utf-8", newline="")  # noqa: SIM115
        self._file.write(self._serialize(records, new_file=self._file.tell() == 0))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._done.update(record["image"] for record in records)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _not_ours(path: Path, what: str) -> UsageError:
    return UsageError(
        f"{path}: {what}, so it is not a safellava output (or it was edited): nothing was changed; "
        "choose another --output, or fix or move the file"
    )


class JsonlWriter(_AppendWriter):
    """One JSON object per line."""

    extension = "jsonl"

    def _scan(self, data: bytes) -> tuple[int, list[dict[str, Any]]]:
        records: list[dict[str, Any]] = []
        start = kept = 0
        number = 0
        while (end := data.find(b"\n", start)) != -1:
            number += 1
            line = data[start:end]
            if line.strip():
                try:
                    record = json.loads(line)
                except ValueError:  # also bytes that are not UTF-8
                    record = None
                if not isinstance(record, dict) or "image" not in record:
                    if data.find(b"\n", end + 1) == -1:
                        break  # the last line: a write cut short by a kill
                    raise _not_ours(self.path, f"line {number} is not a JSON record with an image")
                records.append(record)
            start = kept = end + 1
        return kept, records

    def _serialize(self, records: list[dict[str, Any]], new_file: bool) -> str:
        # \u2028 and \u2029 stay escaped: some readers split lines on them.
        return (
            "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
            .replace("\u2028", "\\u2028")
            .replace("\u2029", "\\u2029")
        )


class CsvWriter(_AppendWriter):
    """A header row, then one row per record; captions with newlines are quoted."""

    extension = "csv"

    def __init__(self, path: Path, fields: tuple[str, ...] = RECORD_FIELDS):
        super().__init__(path)
        self.fields = fields

    def _rows(self, data: bytes) -> list[list[str]] | None:
        try:
            return list(csv.reader(io.StringIO(data.decode("utf-8"), newline=""), strict=True))
        except (UnicodeDecodeError, csv.Error):
            return None

    def _scan(self, data: bytes) -> tuple[int, list[dict[str, Any]]]:
        header_end = data.find(b"\n")
        if header_end == -1:
            return 0, []  # not even a whole header: the first write was cut short
        if self._rows(data[: header_end + 1]) != [list(self.fields)]:
            raise _not_ours(self.path, f"its header is not {','.join(self.fields)}")
        # Drop lines from the end until what is left parses as whole rows: a record cut short by a
        # kill can only be at the end, so that is all that is ever dropped.
        end = len(data) if data.endswith(b"\n") else data.rfind(b"\n") + 1
        while end > header_end:
            rows = self._rows(data[:end])
            if rows is not None:
                short = [index for index, row in enumerate(rows) if len(row) != len(self.fields)]
                if not short:
                    return end, [dict(zip(self.fields, row, strict=True)) for row in rows[1:]]
                if short != [len(rows) - 1]:
                    raise _not_ours(self.path, f"row {short[0] + 1} does not have {len(self.fields)} columns")
            end = data.rfind(b"\n", 0, end - 1) + 1
        return header_end + 1, []

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
