"""Folder captioning: discovery, sharding, resume, background decoding, batches, error isolation."""

from __future__ import annotations

import hashlib
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import GenerationOptions
from .errors import ImageError, UsageError
from .generate import OOM_MESSAGE
from .images import DEFAULT_MAX_PIXELS, load_image
from .model import SafeLlava
from .records import CaptionRecord
from .writers import FORMATS, JsonlWriter, SidecarWriter, Writer, get_writer

DEFAULT_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
# Decoded pixels of one batch (0.4 GB as RGB): a bound on what each decoding thread holds at once.
DEFAULT_MAX_BATCH_PIXELS = 128_000_000


@dataclass(frozen=True)
class Item:
    """An image found under the input folder."""

    path: Path  # the file, as reached from the input folder
    name: str  # its path relative to the input folder, with "/" separators


@dataclass
class BatchOptions:
    """What to caption and where the captions go."""

    root: Path  # the input folder
    recursive: bool = False  # descend into subfolders
    extensions: tuple[str, ...] = DEFAULT_EXTENSIONS  # image file extensions, any case
    format: str = "txt"  # txt (a caption file per image) | jsonl | csv
    output: Path | None = None  # txt: a folder to mirror into; jsonl/csv: the file
    caption_ext: str = ".txt"  # extension of txt caption files
    prefix: str = ""  # put before each caption
    suffix: str = ""  # put after each caption
    overwrite: bool = False  # recaption images that already have a caption
    errors: Path | None = None  # where failures are recorded; None: beside the output
    workers: int = 2  # background threads decoding and preprocessing images
    shard: tuple[int, int] = (1, 1)  # (K, N): take the K-th of N deterministic parts
    max_pixels: int = DEFAULT_MAX_PIXELS  # larger images are refused (decompression bombs)
    max_batch_pixels: int = DEFAULT_MAX_BATCH_PIXELS  # a batch is cut before its images exceed this

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        if self.format not in FORMATS:
            raise UsageError(f"unknown format {self.format!r}: use {', '.join(FORMATS)}")
        if self.format != "txt" and self.output is None:
            raise UsageError(f"--format {self.format} needs --output FILE")
        if self.output is not None:
            self.output = Path(self.output)
        if self.format != "txt" and self.output is not None and self.output.is_dir():
            raise UsageError(f"--output {self.output} is a folder: --format {self.format} writes one file")
        if (
            self.format == "txt"
            and self.output is not None
            and self.output.exists()
            and not self.output.is_dir()
        ):
            raise UsageError(
                f"--output {self.output} is a file: --format txt writes caption files into a folder"
            )
        self.caption_ext = self.caption_ext if self.caption_ext.startswith(".") else f".{self.caption_ext}"
        bare = self.caption_ext[1:]
        if not bare or "/" in bare or "\\" in bare or bare.lower() in self.image_extensions:
            raise UsageError(
                f"--caption-ext {self.caption_ext!r}: use a plain extension that is not an image's, such as .txt"
            )
        index, count = self.shard
        if not 1 <= index <= count:
            raise UsageError(f"shard {index}/{count}: K must be between 1 and N")
        if self.workers < 0:
            raise UsageError("--workers must be 0 (decode in the main thread) or more")
        if not self.extensions:
            raise UsageError("--ext names no extension: give a comma-separated list such as jpg,png")

    def decorate(self, caption: str) -> str:
        """The caption as written: with ``prefix`` and ``suffix``."""
        return f"{self.prefix}{caption}{self.suffix}"

    @property
    def image_extensions(self) -> set[str]:
        """Every extension an image may have here (the ones asked for and the usual ones), lower case."""
        return {e.lower().lstrip(".") for e in (*self.extensions, *DEFAULT_EXTENSIONS)}

    @property
    def errors_path(self) -> Path:
        """The errors file: as given, or beside the output (documented default)."""
        if self.errors is not None:
            return Path(self.errors)
        index, count = self.shard
        tag = f".shard-{index}-of-{count}" if count > 1 else ""
        if self.format == "txt":
            return (self.output or self.root) / f"safellava-errors{tag}.jsonl"
        assert self.output is not None
        # captions.jsonl -> captions.errors.jsonl; any other format keeps its name apart from it:
        # captions.csv -> captions.csv.errors.jsonl.
        stem = self.output.stem if self.output.suffix.lower() == ".jsonl" else self.output.name
        return self.output.with_name(f"{stem}{tag}.errors.jsonl")

    def check_paths(self) -> None:
        """Refuse output and errors paths that are images, the same file, or not plain files."""
        named = [("--errors", self.errors_path)]
        if self.format != "txt" and self.output is not None:
            named.insert(0, ("--output", self.output))
        for flag, path in named:
            if path.suffix.lower().lstrip(".") in self.image_extensions:
                raise UsageError(f"{flag} {path} is named like an image: choose a .jsonl or .csv file name")
            if path.exists() and not path.is_file():
                raise UsageError(f"{flag} {path} is not a plain file: choose a file name")
        if self.format != "txt" and self.output is not None and _same_file(self.output, self.errors_path):
            raise UsageError(f"--errors {self.errors_path} is the --output file: give them different names")


def _same_file(a: Path, b: Path) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def header_pixels(path: Path) -> int:
    """Width times height from an image file's header (no decoding); 0 when it cannot be read."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            width, height = image.size
    except Exception:  # the worker that decodes it reports why
        return 0
    return width * height


def parse_shard(text: str) -> tuple[int, int]:
    """``"K/N"`` -> (K, N), with 1 <= K <= N."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise UsageError(f"--shard {text!r}: use K/N, for example 2/8") from None
    if count < 1 or not 1 <= index <= count:
        raise UsageError(f"--shard {text!r}: K must be between 1 and N")
    return index, count


def in_shard(name: str, shard: tuple[int, int]) -> bool:
    """Whether an image belongs to a shard: a stable hash of its relative path, modulo N."""
    index, count = shard
    digest = hashlib.sha1(name.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % count == index - 1


def discover(
    root: Path, recursive: bool = False, extensions: Iterable[str] = DEFAULT_EXTENSIONS
) -> list[Item]:
    """Image files under ``root`` by extension, hidden ones skipped, in a stable sorted order."""
    root = Path(root)
    if not root.is_dir():
        raise UsageError(f"{root} is not a folder")
    wanted = {extension.lower().lstrip(".") for extension in extensions}
    found: list[Item] = []
    visited: set[str] = set()

    def walk(folder: Path, prefix: str) -> None:
        real = os.path.realpath(folder)
        if real in visited:  # a symlink loop, or a folder reached twice
            return
        visited.add(real)
        try:
            entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
        except OSError:
            return
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                if entry.is_dir():
                    if recursive:
                        walk(Path(entry.path), f"{prefix}{entry.name}/")
                elif entry.is_file() and Path(entry.name).suffix.lower().lstrip(".") in wanted:
                    found.append(Item(Path(entry.path), f"{prefix}{entry.name}"))
            except OSError:
                continue  # a broken symlink or a vanished file

    walk(root, "")
    return sorted(found, key=lambda item: item.name)


@dataclass
class BatchPlan:
    """Which images will be captioned, which are already done, and which cannot be."""

    todo: list[Item] = field(default_factory=list)
    skipped: list[Item] = field(default_factory=list)
    refused: list[tuple[Item, str]] = field(default_factory=list)


def open_writer(options: BatchOptions, dry_run: bool = False) -> Writer:
    """The output writer, with the records already there read (resume) or cleared (overwrite).

    A dry run changes nothing on disk.
    """
    options.check_paths()
    writer = get_writer(options.format, options.root, options.output, options.caption_ext)
    # Read even with --overwrite: a file that is not safellava's is refused, never replaced.
    writer.load(repair=not dry_run and not options.overwrite)
    if options.overwrite and not dry_run:
        writer.reset()
    error_log(options).load(repair=False)  # the errors file is rewritten each run: it must be ours too
    return writer


def error_log(options: BatchOptions) -> JsonlWriter:
    """The errors file: one JSON record per failed image, with ``image`` and ``error``."""
    log = JsonlWriter(options.errors_path, required=("image", "error"))
    log.flag = "--errors"
    return log


def plan_folder(options: BatchOptions, writer: Writer) -> BatchPlan:
    """Discover, shard and split the images of a folder (what ``--dry-run`` shows)."""
    items = discover(options.root, options.recursive, options.extensions)
    items = [item for item in items if in_shard(item.name, options.shard)]
    return plan_batch(items, writer, options.overwrite)


def plan_batch(items: list[Item], writer: Writer, overwrite: bool) -> BatchPlan:
    """Split the images into to-do and already captioned; refuse caption-file name clashes."""
    plan = BatchPlan()
    claimed: dict[Path, str] = {}
    for item in items:
        if isinstance(writer, SidecarWriter):
            try:
                target = writer.target(item.name)
            except ValueError as exc:
                plan.refused.append((item, str(exc)))
                continue
            if target in claimed:
                plan.refused.append((item, f"its caption file {target.name} is also {claimed[target]}'s"))
                continue
            claimed[target] = item.name
        if not overwrite and writer.is_done(item.name):
            plan.skipped.append(item)
        else:
            plan.todo.append(item)
    return plan


@dataclass
class Progress:
    """Where a batch run stands, after each batch."""

    done: int  # images captioned or failed in this run
    total: int  # images to caption in this run
    captioned: int
    failed: int
    skipped: int  # already captioned before this run
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.done / self.seconds if self.seconds else 0.0


class RunLog:
    """Writes a run's records and failures as they come, and keeps its progress (any way of captioning).

    The errors file lists this run's failures only (a rerun retries earlier ones); it is removed when
    nothing failed.
    """

    def __init__(
        self,
        options: BatchOptions,
        writer: Writer,
        plan: BatchPlan,
        on_progress: Callable[[Progress], None] | None,
    ):
        self.options = options
        self.writer = writer
        self.on_progress = on_progress
        self.errors = error_log(options)
        self.started = time.perf_counter()
        self.progress = Progress(0, len(plan.todo) + len(plan.refused), 0, 0, len(plan.skipped), 0.0)
        self._refused = [(item.name, reason) for item, reason in plan.refused]

    def __enter__(self) -> RunLog:
        self.errors.reset()
        self.add([], self._refused, report=False)
        return self

    def add(self, records: list[CaptionRecord], failures: list[tuple[str, str]], report: bool = True) -> None:
        """Write a batch's records and failures (image name, reason), then report progress."""
        if records:
            self.writer.write(records)
        if failures:
            self.errors.write({"image": name, "error": reason} for name, reason in failures)
        self.progress.captioned += len(records)
        self.progress.failed += len(failures)
        self.progress.done += len(records) + len(failures)
        self.progress.seconds = time.perf_counter() - self.started
        if report and self.on_progress is not None:
            self.on_progress(self.progress)

    def __exit__(self, *exc: Any) -> None:
        try:
            self.writer.close()
        finally:
            self.errors.close()
        if exc[0] is None and not self.progress.failed:
            # Nothing failed this time: an errors file of an earlier run would list stale failures.
            self.options.errors_path.unlink(missing_ok=True)
        self.progress.seconds = time.perf_counter() - self.started


@dataclass
class Prepared:
    """A batch ready for ``generate``: the images that opened, their inputs, and the failures.

    The decoded images themselves are not kept (they can be far larger than the inputs); the rare
    out-of-memory retry opens them again.
    """

    items: list[Item]
    inputs: Any
    failures: list[tuple[Item, str]]


class Reopened(Sequence[Any]):
    """The images of a prepared batch, opened again only when a retry reads them."""

    def __init__(self, items: list[Item], max_pixels: int):
        self.items = items
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [load_image(item.path, self.max_pixels) for item in self.items[index]]
        return load_image(self.items[index].path, self.max_pixels)


class BatchCaptioner:
    """Captions a folder with one loaded model: prefetching batches, writing as it goes."""

    def __init__(
        self, loaded: SafeLlava, options: BatchOptions, generation: GenerationOptions, writer: Writer
    ):
        self.loaded = loaded
        self.engine = loaded.engine
        self.options = options
        self.generation = generation
        self.writer = writer
        self.sizer = self.engine.sizer(generation.batch_size)  # halves on out-of-memory, and stays halved
        self.prompt = self.engine.caption_prompt(generation)

    def prepare(self, items: list[Item]) -> Prepared:
        """Open the images and build the model inputs (runs in a worker thread)."""
        opened, images, failures = [], [], []
        for item in items:
            try:
                images.append(load_image(item.path, self.options.max_pixels))
                opened.append(item)
            except ImageError as exc:
                failures.append((item, exc.reason))
            except Exception as exc:
                failures.append((item, f"cannot be read ({type(exc).__name__}: {exc})"))
        inputs = self.engine.prepare(images, [self.prompt] * len(images)) if images else None
        return Prepared(opened, inputs, failures)

    def _batches(self, items: list[Item]) -> Iterator[list[Item]]:
        """Consecutive batches of the current size, cut short where their pixels would exceed the budget."""
        chunk: list[Item] = []
        pixels = 0
        for item in items:
            size = header_pixels(item.path)
            if chunk and (len(chunk) >= self.sizer.size or pixels + size > self.options.max_batch_pixels):
                yield chunk
                chunk, pixels = [], 0
            chunk.append(item)
            pixels += size
        if chunk:
            yield chunk

    def _prefetched(self, items: list[Item]) -> Iterator[Prepared]:
        if self.options.workers == 0:
            yield from (self.prepare(batch) for batch in self._batches(items))
            return
        depth = self.options.workers + 1
        with ThreadPoolExecutor(self.options.workers, thread_name_prefix="safellava-decode") as pool:
            pending: deque[Any] = deque()
            for batch in self._batches(items):
                pending.append(pool.submit(self.prepare, batch))
                if len(pending) >= depth:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()

    def run(self, plan: BatchPlan, on_progress: Callable[[Progress], None] | None = None) -> Progress:
        """Caption ``plan.todo``, writing captions and failures after every batch."""
        with RunLog(self.options, self.writer, plan, on_progress) as log:
            for prepared in self._prefetched(plan.todo):
                failures = [(item.name, reason) for item, reason in prepared.failures]
                records = []
                if prepared.items:
                    reopened = Reopened(prepared.items, self.options.max_pixels)
                    captions = self.engine.caption(reopened, self.generation, prepared.inputs)
                    for item, caption in zip(prepared.items, captions, strict=True):
                        if caption is None:
                            failures.append((item.name, OOM_MESSAGE))
                        else:
                            records.append(self._record(item, caption))
                log.add(records, failures)
        return log.progress

    def _record(self, item: Item, caption: str) -> CaptionRecord:
        return self.loaded.record(item.name, self.options.decorate(caption), self.generation)
