"""Command line: parse, call the library, print. No tensors here, and no torch import for --help."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import __version__
from .config import (
    DEFAULT_PRESET,
    DTYPE_CHOICES,
    ORIGINAL_TOWER,
    PROMPT_FORMATS,
    QUANTIZE_CHOICES,
    available_presets,
    resolve_options,
)
from .errors import SafeLlavaError, UsageError

PROG = "safellava"
EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _seed(text: str) -> int:
    value = int(text)
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"must be between 0 and 2**32 - 1, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _model_arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("model")
    group.add_argument(
        "--preset",
        help=f"preset name ({', '.join(available_presets())}) or YAML path; default {DEFAULT_PRESET}",
    )
    group.add_argument("--model", help="LLaVA checkpoint: hub id or local folder (overrides the preset)")
    group.add_argument("--revision", help="branch, tag or commit of the LLaVA hub repo")
    group.add_argument(
        "--vision-tower",
        help=f"CLIP tower: hub id or local folder; '{ORIGINAL_TOWER}' keeps the LLaVA's own (unsafe) tower",
    )
    group.add_argument("--tower-revision", help="branch, tag or commit of the tower hub repo")
    group.add_argument(
        "--quantize", choices=QUANTIZE_CHOICES, help="bitsandbytes quantization of the language model"
    )
    group.add_argument("--device", help="auto (CUDA if present, else CPU), cpu, cuda, cuda:N or mps")
    group.add_argument("--dtype", choices=DTYPE_CHOICES, help="auto: float16 on CUDA, float32 on the CPU")
    group.add_argument(
        "--prompt-format",
        choices=PROMPT_FORMATS,
        help="built-in prompt format, used only when the checkpoint has no chat template",
    )
    return parser


def _generation_arguments(batched: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("generation")
    group.add_argument("--prompt", help="the question or instruction (default: a one-sentence caption)")
    group.add_argument("--system", help="system prompt, for the families that have one")
    group.add_argument("--max-new-tokens", type=_positive_int, help="longest answer, in tokens")
    group.add_argument(
        "--temperature", type=_non_negative_float, help="0 (default) is greedy; above 0 samples"
    )
    group.add_argument("--top-p", type=float, help="nucleus sampling mass, when sampling")
    group.add_argument("--seed", type=_seed, help="random seed, for reproducible sampling")
    if batched:
        group.add_argument("--batch-size", type=_positive_int, help="images per generate call")
    return parser


def _common_arguments(top_level: bool = False) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        # A subcommand's default must not undo a -v given before the subcommand.
        default=False if top_level else argparse.SUPPRESS,
        help="show library logs and full tracebacks",
    )
    return parser


def build_parser() -> argparse.ArgumentParser:
    """The ``safellava`` argument parser with its subcommands."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Safe image-to-text with LLaVA and the Safe-CLIP vision tower.",
        parents=[_common_arguments(top_level=True)],
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    caption = commands.add_parser(
        "caption",
        help="caption or ask about images",
        description="Caption images (or answer --prompt about them) and print the results.",
        parents=[_common_arguments(), _model_arguments(), _generation_arguments()],
    )
    caption.add_argument("images", nargs="+", metavar="IMAGE", help="image files; '-' reads one from stdin")
    caption.add_argument("--json", action="store_true", help="one JSON object per line per image")
    caption.add_argument(
        "--stream", action="store_true", help="print the caption as it is generated (one image)"
    )
    caption.set_defaults(handler=run_caption)

    chat = commands.add_parser(
        "chat",
        help="talk about an image, turn by turn",
        description="Chat about an image: answers stream as they are generated; /help lists the commands. "
        "With stdin not a terminal, each line is a question and only the answers are printed.",
        parents=[_common_arguments(), _model_arguments(), _generation_arguments(batched=False)],
    )
    chat.add_argument("image", nargs="?", metavar="IMAGE", help="the image to talk about (or /image later)")
    chat.set_defaults(handler=run_chat)

    batch = commands.add_parser(
        "batch",
        help="caption every image in a folder (resumable)",
        description="Caption the images of a folder. Images already captioned are skipped, so a rerun "
        "after a crash continues where it stopped; failures go to an errors file and the run goes on.",
        parents=[_common_arguments(), _model_arguments(), _generation_arguments()],
    )
    batch.add_argument("folder", metavar="FOLDER", help="folder of images")
    found = batch.add_argument_group("which images")
    found.add_argument("-r", "--recursive", action="store_true", help="descend into subfolders")
    found.add_argument(
        "--ext",
        help="comma-separated image extensions, any case (default: jpg,jpeg,png,webp,bmp,gif,tif,tiff)",
    )
    found.add_argument("--shard", help="K/N: caption only the K-th of N deterministic parts (1 <= K <= N)")
    found.add_argument("--max-pixels", type=_positive_int, help="refuse larger images (default 64000000)")
    found.add_argument(
        "--overwrite", action="store_true", help="recaption images that already have a caption"
    )
    found.add_argument("--dry-run", action="store_true", help="list what would be captioned and skipped")
    out = batch.add_argument_group("output")
    out.add_argument("--format", choices=("txt", "jsonl", "csv"), default="txt", help="default: txt")
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
    speed = batch.add_argument_group("speed")
    speed.add_argument("--workers", type=int, default=2, help="threads decoding images ahead (default 2)")
    speed.add_argument(
        "--log-every", type=_positive_int, default=100, help="progress line every N images, off a terminal"
    )
    batch.set_defaults(handler=run_batch)

    compare = commands.add_parser(
        "compare",
        help="caption images through the safe and the original tower, side by side",
        description="Caption each image twice with the same LLaVA, prompt and seed: through the Safe-CLIP "
        "tower and through the checkpoint's original CLIP tower. The language model is loaded once.",
        parents=[_common_arguments(), _model_arguments(), _generation_arguments()],
    )
    compare.add_argument("images", nargs="+", metavar="IMAGE", help="image files; '-' reads one from stdin")
    compare.add_argument("--json", action="store_true", help="one JSON object per line per image")
    compare.set_defaults(handler=run_compare)

    export = commands.add_parser(
        "export",
        help="write the LLaVA with the Safe-CLIP tower baked in, for plain transformers and serving engines",
        description="Write a merged checkpoint (safetensors, standard transformers layout) with a model card "
        "and safellava.json. Half precision unless --dtype says otherwise.",
        parents=[_common_arguments(), _model_arguments()],
    )
    export.add_argument("out_dir", metavar="OUT_DIR", help="folder to create (must be empty, or --force)")
    export.add_argument("--force", action="store_true", help="replace a non-empty OUT_DIR")
    export.set_defaults(handler=run_export)

    info = commands.add_parser(
        "info",
        help="what a preset or model/tower resolves to, and whether the tower fits",
        description="Resolved checkpoints and revisions, family and prompt format, the tower's fit, "
        "parameter counts, expected weight memory, the tower fingerprint, versions and devices. "
        "Reads configs only (and the tower's weights if they are on disk) unless --load.",
        parents=[_common_arguments(), _model_arguments()],
    )
    info.add_argument("--load", action="store_true", help="also load the model and report its real footprint")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.set_defaults(handler=run_info)
    return parser


def _say(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


def load_model(args: argparse.Namespace) -> Any:
    """Load the model the arguments describe (the library call behind every command)."""
    from . import logs
    from .loader import load

    # Flags and preset are checked before minutes of loading, and the preset may choose the tower.
    options, _, _ = resolve_options(args.preset, **model_overrides(args), **generation_overrides(args))
    logs.configure(args.verbose)
    if options.uses_original_tower:
        _say("using the checkpoint's original CLIP vision tower, not Safe-CLIP (--vision-tower original)")
    return load(args.preset, **model_overrides(args))


def model_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The model flags, by ``ModelOptions`` field name (None where not given)."""
    names = (
        "model",
        "vision_tower",
        "revision",
        "tower_revision",
        "quantize",
        "device",
        "dtype",
        "prompt_format",
    )
    return {name: getattr(args, name) for name in names}


def generation_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The generation flags that were given, by ``GenerationOptions`` field name."""
    names = ("prompt", "system", "max_new_tokens", "temperature", "top_p", "seed", "batch_size")
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def open_images(sources: Sequence[str]) -> tuple[list[tuple[str, Any]], int]:
    """Open every image; report each bad one in a line on stderr. Returns (opened, failures)."""
    from .errors import ImageError
    from .images import load_image

    if sources.count("-") > 1:
        raise UsageError("'-' (stdin) can be given only once")
    opened, failures = [], 0
    for source in sources:
        try:
            data: Any = sys.stdin.buffer.read() if source == "-" else source
            image = load_image(data)
        except ImageError as exc:
            _say(f"skipped {source if source != '-' else '<stdin>'}: {exc.reason}")
            failures += 1
            continue
        opened.append((source, image))
    return opened, failures


def _stream_to_stdout(answer: Any) -> None:
    for chunk in answer:
        sys.stdout.write(chunk)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()


def run_caption(args: argparse.Namespace) -> int:
    """``safellava caption``: print one caption (or JSON record) per image as batches finish."""
    if args.stream and (len(args.images) > 1 or args.json):
        raise UsageError("--stream takes one image and prints plain text (no --json)")
    opened, failures = open_images(args.images)
    if not opened:
        _say("no image could be read")
        return EXIT_SOME_FAILED
    model = load_model(args)
    options = model.generation_options(**generation_overrides(args))
    if args.stream:
        _stream_to_stdout(model.stream(opened[0][1], **generation_overrides(args)))
        return EXIT_OK
    several = len(args.images) > 1
    for start in range(0, len(opened), options.batch_size):
        chunk = opened[start : start + options.batch_size]
        captions = model.caption_images([image for _, image in chunk], options)
        for (name, _), caption in zip(chunk, captions, strict=True):
            if args.json:
                record = {
                    "image": name,
                    "caption": caption,
                    "prompt": options.prompt,
                    **model.record(),
                    "generation": {
                        "max_new_tokens": options.max_new_tokens,
                        "temperature": options.temperature,
                        "top_p": options.top_p,
                        "seed": options.seed,
                        "system": options.system,
                    },
                }
                print(json.dumps(record, ensure_ascii=False), flush=True)
            else:
                print(f"{name}: {caption}" if several else caption, flush=True)
    return EXIT_SOME_FAILED if failures else EXIT_OK


def _batch_options(args: argparse.Namespace) -> Any:
    from .batch import DEFAULT_EXTENSIONS, BatchOptions, parse_shard
    from .images import DEFAULT_MAX_PIXELS

    extensions = (
        tuple(e.strip() for e in args.ext.split(",") if e.strip()) if args.ext else DEFAULT_EXTENSIONS
    )
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
    )


def _read_prompt_file(path: str) -> str:
    try:
        prompt = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise UsageError(f"--prompt-file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise UsageError(f"--prompt-file {path} is not UTF-8 text") from None
    if not prompt:
        raise UsageError(f"--prompt-file {path} is empty")
    return prompt


class _ProgressReport:
    """A progress bar on a terminal; elsewhere a plain line every N images."""

    def __init__(self, total: int, skipped: int, every: int):
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
            _say(
                f"{progress.done}/{progress.total} images, {rate:.2f} images/s, "
                f"{progress.failed} failed, ETA {left:.0f}s"
            )
            while self.next_line <= progress.done:
                self.next_line += self.every
        self.shown = progress.done

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_batch(args: argparse.Namespace) -> int:
    """``safellava batch``: caption a folder, resumable, failures recorded and skipped."""
    from .batch import BatchCaptioner, open_writer, plan_folder

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
            print(f"caption\t{item.name}")
        for item in plan.skipped:
            print(f"skip\t{item.name}")
        for item, reason in plan.refused:
            print(f"refuse\t{item.name}\t{reason}")
        _say(
            f"dry run: {len(plan.todo)} to caption, {len(plan.skipped)} already captioned, {len(plan.refused)} refused"
        )
        return EXIT_OK
    if not plan.todo and not plan.refused:
        _say(f"nothing to caption: {len(plan.skipped)} images already captioned (--overwrite redoes them)")
        return EXIT_OK
    model = load_model(args)
    captioner = BatchCaptioner(model, options, model.generation_options(**generation_overrides(args)), writer)
    report = _ProgressReport(len(plan.todo) + len(plan.refused), len(plan.skipped), args.log_every)
    try:
        progress = captioner.run(plan, on_progress=report)
    finally:
        report.close()
    _say(
        f"captioned {progress.captioned}, skipped {progress.skipped} already captioned, "
        f"failed {progress.failed}, in {progress.seconds:.1f}s ({progress.images_per_second:.2f} images/s)"
    )
    if progress.failed:
        _say(f"failures are listed in {options.errors_path}; a rerun retries them")
        return EXIT_SOME_FAILED
    return EXIT_OK


def _wrap_table(rows: list[tuple[str, str, str]], headers: tuple[str, str, str]) -> str:
    """A three-column text table wrapped to the terminal's width."""
    import shutil
    import textwrap

    width = shutil.get_terminal_size((100, 24)).columns
    first = min(max(len(headers[0]), *(len(r[0]) for r in rows)), width // 4)
    rest = max(20, (width - first - 6) // 2)
    lines = []
    for row in [headers, *rows]:
        cells = [textwrap.wrap(cell, w) or [""] for cell, w in zip(row, (first, rest, rest), strict=True)]
        for index in range(max(len(c) for c in cells)):
            parts = [
                (c[index] if index < len(c) else "").ljust(w)
                for c, w in zip(cells, (first, rest, rest), strict=True)
            ]
            lines.append(" | ".join(parts).rstrip())
        if row is headers:
            lines.append("-+-".join("-" * w for w in (first, rest, rest)))
    return "\n".join(lines)


def run_compare(args: argparse.Namespace) -> int:
    """``safellava compare``: each image's caption through the safe tower and the original one."""
    from .compare import TowerComparer

    if resolve_options(args.preset, **model_overrides(args))[0].uses_original_tower:
        raise UsageError("compare sets the safe tower against the original one: give a safe --vision-tower")
    opened, failures = open_images(args.images)
    if not opened:
        _say("no image could be read")
        return EXIT_SOME_FAILED
    model = load_model(args)
    options = model.generation_options(**generation_overrides(args))
    comparer = TowerComparer(model)
    names = [name for name, _ in opened]
    results = comparer.compare(names, [image for _, image in opened], options)
    if args.json:
        for result in results:
            record = {
                "image": result.image,
                "prompt": options.prompt,
                "safe": result.safe,
                "original": result.original,
                **model.record(),
                "original_tower": f"{model.model_id} (its own CLIP tower)",
                "seed": options.seed,
            }
            print(json.dumps(record, ensure_ascii=False), flush=True)
    elif sys.stdout.isatty():
        rows = [(r.image, r.safe, r.original) for r in results]
        print(_wrap_table(rows, ("image", f"safe ({model.vision_tower})", "original CLIP")))
    else:
        for result in results:
            print(f"{result.image}\n  safe:     {result.safe}\n  original: {result.original}", flush=True)
    return EXIT_SOME_FAILED if failures else EXIT_OK


def run_export(args: argparse.Namespace) -> int:
    """``safellava export``: the merged checkpoint, written atomically."""
    from .export import check_target, export

    if args.quantize not in (None, "none"):
        raise UsageError(
            f"cannot export a {args.quantize}-quantized model: export in float16 or bfloat16 and "
            "quantize when loading the export (--quantize works on it too)"
        )
    options, _, _ = resolve_options(args.preset, **model_overrides(args))
    check_target(Path(args.out_dir).absolute(), args.force, (options.model, options.vision_tower))
    args.dtype = args.dtype or "float16"
    model = load_model(args)
    target = export(model, args.out_dir, force=args.force)
    _say(f"exported {model.model_id} with the tower {model.vision_tower} to {target}")
    return EXIT_OK


def _human_bytes(count: int) -> str:
    return f"{count / 2**30:.2f} GiB" if count >= 2**30 else f"{count / 2**20:.1f} MiB"


def _info_text(report: dict[str, Any]) -> str:
    model, tower, params = report["model"], report["vision_tower"], report["parameters"]
    lines = [
        f"preset          {report['preset'] or '-'}",
        f"model           {model['id']} (revision {model['revision'] or 'default'}, commit {model['commit'] or '-'})",
        f"family          {model['family']} ({model['language_model']} language model), vision_feature_layer {model['vision_feature_layer']}",
        f"prompt          {'chat template of the checkpoint' if model['chat_template'] else 'built-in format'}; built-in format {model['prompt_format']}",
    ]
    if tower["id"] == ORIGINAL_TOWER:
        lines.append("vision tower    original: the checkpoint's own CLIP (not Safe-CLIP)")
    else:
        lines.append(
            f"vision tower    {tower['id']} (revision {tower['revision'] or 'default'}, commit {tower['commit'] or '-'})"
        )
        shape = tower["shape"]
        lines.append(
            f"tower shape     hidden {shape['hidden_size']}, image {shape['image_size']}, patch {shape['patch_size']}, {shape['num_hidden_layers']} layers"
        )
        lines.append(
            "tower fit       fits"
            if tower["fits"]
            else f"tower fit       DOES NOT FIT: {'; '.join(tower['problems'])}. Use {tower['fits_hint']}"
        )
        lines.append(f"fingerprint     {tower['fingerprint'] or tower.get('fingerprint_note')}")
    lines.append(
        f"parameters      tower {params['vision_tower']:,}, projector {params['projector']:,}, "
        f"language model {params['language_model']:,}, total {params['total']:,}"
    )
    memory = report["weight_memory_bytes"]
    lines.append(
        f"weight memory   {_human_bytes(memory['none'])} in half precision, {_human_bytes(memory['8bit'])} with 8bit, "
        f"{_human_bytes(memory['4bit'])} with 4bit (approximate)"
    )
    versions = ", ".join(
        f"{name} {version or 'not installed'}" for name, version in report["versions"].items()
    )
    lines.append(f"versions        {versions}")
    devices = ", ".join(
        f"cuda:{d['index']} {d['name']} ({d['memory_gib']} GiB)" if d["type"] == "cuda" else d["type"]
        for d in report["devices"]
    )
    lines.append(f"devices         {devices}")
    if "loaded" in report:
        loaded = report["loaded"]
        lines.append(
            f"loaded          in {loaded['seconds']}s on {loaded['device']}, {loaded['dtype']}, quantize {loaded['quantize']}: "
            f"{_human_bytes(loaded['memory_footprint_bytes'])}"
        )
    return "\n".join(lines)


def run_info(args: argparse.Namespace) -> int:
    """``safellava info``: resolved checkpoints, tower fit, sizes, versions and devices."""
    from . import logs
    from .info import describe

    logs.configure(args.verbose)
    options, _, preset = resolve_options(args.preset, **model_overrides(args))
    report = describe(options, preset=preset, load=args.load)
    print(json.dumps(report, indent=2) if args.json else _info_text(report))
    return EXIT_OK


def _banner(model: Any) -> str:
    name = model.preset if model.preset and model.model_id == model.options.model else model.model_id
    precision = model.options.quantize if model.options.quantize != "none" else str(model.placement.dtype)
    return f"{PROG} · {name} · tower {model.vision_tower} · {precision.replace('torch.', '')} · /help for commands"


def _terminal_reader(prompt: str) -> str | None:
    try:
        return input(prompt)
    except EOFError:
        print(file=sys.stderr)
        return None


def _pipe_reader(prompt: str) -> str | None:
    line = sys.stdin.readline()
    return line if line else None


def run_chat(args: argparse.Namespace) -> int:
    """``safellava chat``: a conversation about an image, in a terminal or from piped stdin."""
    from .chat import ChatSession
    from .images import load_image
    from .repl import ChatIO, ChatLoop

    image = load_image(args.image) if args.image else None
    model = load_model(args)
    session = ChatSession(model, model.generation_options(**generation_overrides(args)))
    if image is not None:
        session.set_image(image, name=args.image)
    interactive = sys.stdin.isatty()
    if interactive:
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401 - line editing and history for input()

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    io = ChatIO(
        read_line=_terminal_reader if interactive else _pipe_reader,
        write=write,
        error=lambda message: _say(message),
        notice=lambda message: print(message, file=sys.stderr, flush=True),
        interactive=interactive,
    )
    if interactive:
        io.notice(_banner(model))
        if image is None:
            io.notice("no image yet: questions are text only until /image PATH")
    failures = ChatLoop(session, io).run()
    return EXIT_SOME_FAILED if failures else EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``safellava`` command; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if hasattr(args, "preset"):  # a model command: check preset and flags before any work
            resolve_options(args.preset, **model_overrides(args), **generation_overrides(args))
        return args.handler(args)
    except SafeLlavaError as exc:
        if args.verbose:
            raise
        _say(f"error: {exc}")
        return exc.exit_code
    except KeyboardInterrupt:
        _say("interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        sys.stderr.close()  # the reader went away (| head): nothing more to say
        return EXIT_OK
    except Exception as exc:
        if args.verbose:
            raise
        _say(f"error: {type(exc).__name__}: {exc} (rerun with --verbose for the traceback)")
        return EXIT_SOME_FAILED
