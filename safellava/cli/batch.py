"""``safellava batch``: caption a folder, resumable, failures recorded and skipped."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..writers import FORMATS
from .common import EXIT_OK, EXIT_SOME_FAILED, announce_tower, load_model, print_line, printable, say
from .options import (
    add_backend,
    add_generation,
    add_model,
    generation_overrides,
    model_overrides,
    positive_int,
    resolved,
)

HELP = "caption every image in a folder (resumable)"
DESCRIPTION = (
    "Caption the images of a folder. Images already captioned are skipped, so a rerun after a crash "
    "continues where it stopped; failures go to an errors file and the run goes on."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The batch command's flags."""
    add_model(parser)
    add_generation(parser)
    parser.add_argument("folder", metavar="FOLDER", help="folder of images")
    found = parser.add_argument_group("which images")
    found.add_argument("-r", "--recursive", action="store_true", help="descend into subfolders")
    found.add_argument(
        "--ext",
        help="comma-separated image extensions, any case (default: jpg,jpeg,png,webp,bmp,gif,tif,tiff)",
    )
    found.add_argument("--shard", help="K/N: caption only the K-th of N deterministic parts (1 <= K <= N)")
    found.add_argument("--max-pixels", type=positive_int, help="refuse larger images (default 64000000)")
    found.add_argument(
        "--max-batch-pixels",
        type=positive_int,
        help="cut a batch before its decoded images exceed this many pixels (default 128000000)",
    )
    found.add_argument(
        "--overwrite", action="store_true", help="recaption images that already have a caption"
    )
    found.add_argument("--dry-run", action="store_true", help="list what would be captioned and skipped")
    out = parser.add_argument_group("output")
    out.add_argument("--format", choices=FORMATS, default="txt", help="default: txt")
    out.add_argument(
        "-o",
        "--output",
        help="txt: folder to mirror caption files into (default: beside each image); jsonl/csv: the file",
    )
    out.add_argument("--caption-ext", default=".txt", help="extension of txt caption files (default .txt)")
    out.add_argument("--prefix", default="", help="text put before each caption")
    out.add_argument("--suffix", default="", help="text put after each caption")
    out.add_argument("--prompt-file", help="read the prompt from this file")
    out.add_argument(
        "--errors",
        help="JSON Lines file of failures (default: safellava-errors.jsonl in the output folder, "
        "or OUTPUT's name with .errors.jsonl for jsonl/csv)",
    )
    speed = parser.add_argument_group("speed")
    speed.add_argument("--workers", type=int, default=2, help="threads decoding images ahead (default 2)")
    speed.add_argument(
        "--log-every", type=positive_int, default=100, help="progress line every N images, off a terminal"
    )
    add_backend(speed)
    cluster = parser.add_argument_group("Ray (extra: safellava[ray])")
    cluster.add_argument(
        "--ray", action="store_true", help="caption on a Ray cluster (a local one if none is named)"
    )
    cluster.add_argument(
        "--ray-address", help="the cluster to join (default: $RAY_ADDRESS, else a local Ray)"
    )
    cluster.add_argument(
        "--num-workers", type=positive_int, default=1, help="actors, each with the model (default 1)"
    )
    cluster.add_argument(
        "--gpus-per-worker", type=float, default=0.0, help="GPUs each actor reserves (default 0)"
    )


def _batch_options(args: argparse.Namespace) -> Any:
    from ..batch import DEFAULT_EXTENSIONS, DEFAULT_MAX_BATCH_PIXELS, BatchOptions, parse_shard
    from ..images import DEFAULT_MAX_PIXELS

    extensions = DEFAULT_EXTENSIONS
    if args.ext is not None:
        extensions = tuple(name for part in args.ext.split(",") if (name := part.strip().lstrip(".")))
    return BatchOptions(
        root=args.folder,
        recursive=args.recursive,
        extensions=extensions,
        format=args.format,
        output=args.output,
        caption_ext=args.caption_ext,
        prefix=args.prefix,
        suffix=args.suffix,
        overwrite=args.overwrite,
        errors=args.errors,
        workers=args.workers,
        shard=parse_shard(args.shard) if args.shard else (1, 1),
        max_pixels=args.max_pixels or DEFAULT_MAX_PIXELS,
        max_batch_pixels=args.max_batch_pixels or DEFAULT_MAX_BATCH_PIXELS,
    )


MAX_PROMPT_BYTES = 2**20  # far beyond any LLaVA's context; the prompt's tokens are checked against it too


def _read_prompt_file(path: str) -> str:
    try:
        if not Path(path).exists():
            raise UsageError(f"--prompt-file {path} does not exist")
        if not Path(path).is_file():
            raise UsageError(f"--prompt-file {path} is not a plain file")
        with open(path, "rb") as file:
            raw = file.read(MAX_PROMPT_BYTES + 1)
        if len(raw) > MAX_PROMPT_BYTES:
            raise UsageError(
                f"--prompt-file {path} is over 1 MiB: a prompt that long fits no model's context"
            )
        prompt = raw.decode("utf-8").strip()
    except OSError as exc:
        raise UsageError(f"--prompt-file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise UsageError(f"--prompt-file {path} is not UTF-8 text") from None
    if not prompt:
        raise UsageError(f"--prompt-file {path} is empty")
    return prompt


class ProgressReport:
    """A progress bar on a terminal; elsewhere a plain line every N images."""

    def __init__(self, total: int, every: int):
        self.every = every
        self.next_line = every
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="img", desc="captioning", file=sys.stderr, dynamic_ncols=True)
        self.shown = 0

    def __call__(self, progress: Any) -> None:
        if self.bar is not None:
            self.bar.update(progress.done - self.shown)
            self.bar.set_postfix(failed=progress.failed, refresh=False)
        elif progress.done >= self.next_line or progress.done == progress.total:
            rate = progress.images_per_second
            left = (progress.total - progress.done) / rate if rate else 0.0
            say(
                f"{progress.done}/{progress.total} images, {rate:.2f} images/s, "
                f"{progress.failed} failed, ETA {left:.0f}s"
            )
            while self.next_line <= progress.done:
                self.next_line += self.every
        self.shown = progress.done

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _here(args: argparse.Namespace, plan: Any, options: Any, writer: Any, report: Any) -> Any:
    """Caption in this process, with the model loaded here."""
    from ..batch import BatchCaptioner

    model = load_model(args)
    captioner = BatchCaptioner(model, options, model.generation_options(**generation_overrides(args)), writer)
    return captioner.run(plan, on_progress=report)


def _on_ray(args: argparse.Namespace, plan: Any, options: Any, writer: Any, report: Any) -> Any:
    """Caption on Ray: each actor loads the model the flags describe (the preset travels whole)."""
    from .. import logs
    from ..config import load_preset
    from ..loader import check_setup
    from ..ray_batch import RayOptions, require_ray, run_on_ray

    require_ray()
    model_options, generation, _ = resolved(args)
    logs.configure(args.verbose)
    check_setup(model_options)  # what would fail in every actor fails here, in one line
    announce_tower(model_options)
    if args.backend == "vllm":
        from ..vllm_backend import ensure_export, export_dtype, require_vllm

        require_vllm()
        ensure_export(model_options, export_dtype(model_options))  # once, here, rather than in each actor
    preset = load_preset(args.preset) if args.preset else None
    load_options = {"preset": preset, **model_overrides(args)}
    cluster = RayOptions(args.ray_address, args.num_workers, args.gpus_per_worker)
    return run_on_ray(
        plan, options, generation, load_options, writer, cluster, args.backend, report, args.verbose
    )


def plan_scope(options: Any) -> str:
    """Where images were looked for, in words (for a run that found none)."""
    where = f"none with {','.join(options.extensions)} in {options.root}"
    if not options.recursive:
        where += " (subfolders need --recursive)"
    index, count = options.shard
    return where + (f", in shard {index}/{count}" if count > 1 else "")


def run(args: argparse.Namespace) -> int:
    """Plan the folder, then caption what is left, writing as it goes."""
    from ..batch import open_writer, plan_folder

    options = _batch_options(args)
    if args.prompt_file:
        if args.prompt:
            raise UsageError("give --prompt or --prompt-file, not both")
        args.prompt = _read_prompt_file(args.prompt_file)
    try:
        writer = open_writer(options, dry_run=args.dry_run)
    except OSError as exc:
        raise UsageError(f"cannot read {options.output}: {exc.strerror or exc}") from None
    plan = plan_folder(options, writer)
    if args.dry_run:
        for item in plan.todo:
            print_line(f"caption\t{printable(item.name)}")
        for item in plan.skipped:
            print_line(f"skip\t{printable(item.name)}")
        for item, reason in plan.refused:
            print_line(f"refuse\t{printable(item.name)}\t{printable(reason)}")
        say(
            f"dry run: {len(plan.todo)} to caption, {len(plan.skipped)} already captioned, "
            f"{len(plan.refused)} refused"
        )
        return EXIT_OK
    if not plan.todo and not plan.refused:
        if plan.skipped:
            say(f"nothing to caption: {len(plan.skipped)} images already captioned (--overwrite redoes them)")
        else:
            say(f"no images to caption: {plan_scope(options)}")
        return EXIT_OK
    report = ProgressReport(len(plan.todo) + len(plan.refused), args.log_every)
    try:
        progress = (
            _on_ray(args, plan, options, writer, report)
            if args.ray
            else _here(args, plan, options, writer, report)
        )
    finally:
        report.close()
    say(
        f"captioned {progress.captioned}, skipped {progress.skipped} already captioned, "
        f"failed {progress.failed}, in {progress.seconds:.1f}s ({progress.images_per_second:.2f} images/s)"
    )
    if progress.failed:
        say(f"failures are listed in {options.errors_path}; a rerun retries them")
        return EXIT_SOME_FAILED
    return EXIT_OK
