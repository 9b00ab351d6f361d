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
import re
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

from .errors import UsageError, output_error
from .records import CSV_FIELDS, CaptionRecord

RESUME_FIX = "choose another --output (a rerun resumes where this one stopped)"
MAX_TORN_LINES = 1000  # lines of one caption a kill can leave unfinished at the end of a CSV file
# The columns of CSV files written before the record gained its generation settings: still resumed.
LEGACY_CSV_FIELDS = CSV_FIELDS[:9]


@functools.cache
def _umask() -> int:
    # os.umask can only be read by setting it; done once, before any worker thread writes.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def ordinary_mode(directory: bool = False) -> int:
    """The mode a plain ``open``/``mkdir`` gives under the process umask (mkstemp/mkdtemp give 0600/0700)."""
    return (0o777 if directory else 0o666) & ~_umask()


# mkstemp's names: the prefix, eight characters from its alphabet, the suffix.
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp$")


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


class Writer(Protocol):
    """Where batch records go: it knows which images are done, and takes records a batch at a time."""

    def load(self, repair: bool = True) -> None:
        """Read what earlier runs wrote (resume); ``repair`` cuts off what a kill left incomplete."""

    def reset(self) -> None:
        """Start afresh (``--overwrite``)."""

    def is_done(self, image: str) -> bool:
        """Whether ``image`` (a path relative to the input folder) already has a record."""

    def write(self, records: Iterable[CaptionRecord]) -> None:
        """Write whole records, durably."""

    def close(self) -> None:
        """Finish writing."""


class SidecarWriter:
    """One caption file per image, beside it or mirrored under an output folder."""

    def __init__(self, root: Path, output: Path | None, caption_ext: str = ".txt"):
        self.output = Path(os.path.abspath(output or root))
        self.caption_ext = caption_ext if caption_ext.startswith(".") else f".{caption_ext}"
        self._cleaned: set[Path] = set()
        self._real_output = os.path.realpath(self.output)
        self._beside = Path(os.path.abspath(root))  # captions beside the images: the output is the input
        self._inside: dict[Path, bool] = {}

    @classmethod
    def for_batch(cls, root: Path, output: Path | None, caption_ext: str) -> SidecarWriter:
        """Caption files mirrored under ``output``, or beside the images under ``root``."""
        return cls(root, output, caption_ext)

    def target(self, image: str) -> Path:
        """Where the caption of ``image`` (a path relative to the input folder) goes.

        A ``ValueError`` if that place is outside the output folder, by ``..`` or through a symlinked
        folder.
        """
        relative = PurePosixPath(image)
        if relative.is_absolute() or ".." in relative.parts:
            raise ValueError(f"caption path for {image} would fall outside {self.output}")
        target = (self.output / relative).with_suffix(self.caption_ext)
        if not self._inside_output(target.parent):
            raise ValueError(
                f"its caption file would be written outside {self.output} through a symlinked folder "
                "(captions never leave the output folder: "
                + (
                    "write them elsewhere with --output DIR)"
                    if self.output == self._beside
                    else "replace the symlink)"
                )
            )
        return target

    def _inside_output(self, folder: Path) -> bool:
        """Whether ``folder``, its symlinks resolved (existing or not yet), lies inside the output folder."""
        inside = self._inside.get(folder)
        if inside is None:
            real = os.path.realpath(folder)
            inside = os.path.commonpath([real, self._real_output]) == self._real_output
            self._inside[folder] = inside
        return inside

    def is_done(self, image: str) -> bool:
        """True when a non-empty caption file exists for ``image``."""
        target = self.target(image)
        return target.is_file() and target.stat().st_size > 0

    def reset(self) -> None:
        """Nothing to clear: with --overwrite each caption file is replaced as it is written."""

    def load(self, repair: bool = True) -> None:
        """Nothing to read: ``is_done`` looks for each caption file."""

    def write(self, records: Iterable[CaptionRecord]) -> None:
        for record in records:
            target = self.target(record.image)
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                self._remove_leftovers(target.parent)
                atomic_write_text(target, record.caption + "\n")
            except OSError as exc:
                raise output_error(target, exc, RESUME_FIX) from None

    def _remove_leftovers(self, folder: Path) -> None:
        """Remove temporary caption files that a killed run left in ``folder`` (once per folder per run)."""
        if folder in self._cleaned:
            return
        self._cleaned.add(folder)
        try:
            entries = list(os.scandir(folder))
        except OSError:
            return
        for entry in entries:
            match = _TEMPORARY.match(entry.name)
            if match and match["name"].endswith(self.caption_ext) and entry.is_file(follow_symlinks=False):
                Path(entry.path).unlink(missing_ok=True)

    def close(self) -> None:
        """Each caption file is complete once written: nothing to close."""


class _AppendWriter:
    """Records appended to one file, a batch per write; ``done`` from the records already there."""

    format_name = ""
    flag = "--output"  # the option that names this file, for messages

    def __init__(self, path: Path):
        self.path = path
        self._done: set[str] = set()
        self._file: Any = None
        self._fresh = False

    @classmethod
    def for_batch(cls, root: Path, output: Path | None, caption_ext: str) -> _AppendWriter:
        """Records of a folder's images, in the file ``output``."""
        if output is None:
            raise UsageError(f"--format {cls.format_name} needs --output FILE")
        return cls(output)

    def _scan(self, data: bytes) -> tuple[int, list[dict[str, Any]]]:
        """Bytes of whole records at the start of ``data``, and those records."""
        raise NotImplementedError

    def _serialize(self, records: list[Any], new_file: bool) -> str:
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

    def write(self, records: Iterable[Any]) -> None:
        """Append whole records (``CaptionRecord`` or plain mappings), one write and one fsync."""
        records = list(records)
        if not records:
            return
        try:
            if self._file is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                # Kept open across batches; closed by close().
                self._file = open(self.path, "w" if self._fresh else "a", encoding="utf-8", newline="")  # noqa: SIM115
            self._file.write(self._serialize(records, new_file=self._file.tell() == 0))
            self._file.flush()
            os.fsync(self._file.fileno())
        except OSError as exc:
            raise output_error(self.path, exc, RESUME_FIX) from None
        self._done.update(
            record.image if isinstance(record, CaptionRecord) else record["image"] for record in records
        )

    def close(self) -> None:
        if self._file is not None:
            file, self._file = self._file, None
            try:
                file.close()
            except OSError as exc:
                raise output_error(self.path, exc, RESUME_FIX) from None


def _not_ours(writer: _AppendWriter, what: str) -> UsageError:
    return UsageError(
        f"{writer.path}: {what}, so it is not a safellava output (or it was edited): nothing was changed; "
        f"choose another {writer.flag}, or fix or move the file"
    )


RECORD_START = b'{"image": '  # how every JSON record safellava writes begins


def _could_be_cut_short(tail: bytes, start: bytes) -> bool:
    """Whether bytes after the last newline can be a record of ours that a kill cut short."""
    return tail.startswith(start) or start.startswith(tail)


class JsonlWriter(_AppendWriter):
    """One JSON object per line."""

    format_name = "jsonl"

    def __init__(self, path: Path, required: tuple[str, ...] = ("image",)):
        super().__init__(path)
        self.required = required  # keys every record of this file has

    def _scan(self, data: bytes) -> tuple[int, list[dict[str, Any]]]:
        records: list[dict[str, Any]] = []
        start = 0
        number = 0
        while (end := data.find(b"\n", start)) != -1:
            number += 1
            line = data[start:end]
            if line.strip():
                try:
                    record = json.loads(line)
                except ValueError:  # also bytes that are not UTF-8
                    record = None
                if not isinstance(record, dict) or any(key not in record for key in self.required):
                    keys = " and ".join(f'"{key}"' for key in self.required)
                    raise _not_ours(self, f"line {number} is not a JSON record with {keys}")
                records.append(record)
            start = end + 1
        # Whole records end in a newline: what follows the last one can only be a write cut short.
        if start < len(data) and not _could_be_cut_short(data[start:], RECORD_START):
            raise _not_ours(self, f"line {number + 1} is not a JSON record")
        return start, records

    def _serialize(self, records: list[Any], new_file: bool) -> str:
        # \u2028 and \u2029 stay escaped: some readers split lines on them.
        return (
            "".join(json.dumps(_as_dict(record), ensure_ascii=False) + "\n" for record in records)
            .replace("\u2028", "\\u2028")
            .replace("\u2029", "\\u2029")
        )


def _as_dict(record: CaptionRecord | Mapping[str, Any]) -> dict[str, Any]:
    return record.to_dict() if isinstance(record, CaptionRecord) else dict(record)


class CsvWriter(_AppendWriter):
    """A header row, then one row per record; captions with newlines are quoted."""

    format_name = "csv"

    def __init__(self, path: Path, fields: tuple[str, ...] = CSV_FIELDS):
        super().__init__(path)
        self.fields = self._wanted = fields
        self._accepted = (fields, LEGACY_CSV_FIELDS) if fields == CSV_FIELDS else (fields,)

    def reset(self) -> None:
        """Start afresh with this version's columns (an older file's are kept only when resuming it)."""
        super().reset()
        self.fields = self._wanted

    def _rows(self, data: bytes) -> list[list[str]] | None:
        try:
            return list(csv.reader(io.StringIO(data.decode("utf-8"), newline=""), strict=True))
        except (UnicodeDecodeError, csv.Error):
            return None

    def _scan(self, data: bytes) -> tuple[int, list[dict[str, Any]]]:
        header_end = data.find(b"\n")
        if header_end == -1:  # not even a whole header: the first write was cut short, or not ours
            if any(_could_be_cut_short(data, ",".join(fields).encode()) for fields in self._accepted):
                return 0, []
            raise _not_ours(self, f"its header is not {','.join(self.fields)}")
        header = self._rows(data[: header_end + 1])
        known = [fields for fields in self._accepted if header == [list(fields)]]
        if not known:
            raise _not_ours(self, f"its header is not {','.join(self.fields)}")
        self.fields = known[0]  # an older file keeps its columns
        # Whole records end in a newline outside quotes. Drop lines from the end until what is left
        # parses as whole rows: a record cut short by a kill can only be at the end, and it either
        # lacks its final newline or stops inside a quoted caption, so it does not parse.
        end = len(data) if data.endswith(b"\n") else data.rfind(b"\n") + 1
        for _ in range(MAX_TORN_LINES):  # a torn record is one record: never more lines than that
            if end <= header_end:
                return header_end + 1, []
            rows = self._rows(data[:end])
            if rows is not None:
                short = [index for index, row in enumerate(rows) if len(row) != len(self.fields)]
                if short:
                    raise _not_ours(self, f"row {short[0] + 1} does not have {len(self.fields)} columns")
                tail = data[end:]
                if tail and tail.endswith(b"\n") and self._rows(tail) is not None:
                    raise _not_ours(self, f"row {len(rows) + 1} does not have {len(self.fields)} columns")
                return end, [dict(zip(self.fields, row, strict=True)) for row in rows[1:]]
            end = data.rfind(b"\n", 0, end - 1) + 1
        raise _not_ours(self, f"its last {MAX_TORN_LINES} lines do not end a record")

    def _serialize(self, records: list[Any], new_file: bool) -> str:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=self.fields, extrasaction="ignore", lineterminator="\n")
        if new_file:
            writer.writeheader()
        rows = (r.to_row() if isinstance(r, CaptionRecord) else r for r in records)
        writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)
        return buffer.getvalue()


WRITERS: dict[str, Any] = {"txt": SidecarWriter, "jsonl": JsonlWriter, "csv": CsvWriter}
FORMATS = tuple(WRITERS)


def get_writer(fmt: str, root: Path, output: Path | None, caption_ext: str = ".txt") -> Writer:
    """The writer registered for ``fmt``: caption files under ``output`` (or beside the images), or one file."""
    writer = WRITERS.get(fmt)
    if writer is None:
        raise UsageError(f"unknown format {fmt!r}: use {', '.join(FORMATS)}")
    return writer.for_batch(root, output, caption_ext)
