"""Option groups shared by the commands, and how parsed flags become library options."""

from __future__ import annotations

import argparse
from typing import Any

from ..config import (
    DEFAULT_PRESET,
    DTYPE_CHOICES,
    ORIGINAL_TOWER,
    PROMPT_FORMATS,
    QUANTIZE_CHOICES,
    GenerationOptions,
    ModelOptions,
    available_presets,
    resolve_options,
)

MODEL_FLAGS = tuple(ModelOptions.__dataclass_fields__)
GENERATION_FLAGS = tuple(GenerationOptions.__dataclass_fields__)


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
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


def add_common(parser: argparse.ArgumentParser, top_level: bool = False) -> None:
    """``-v/--verbose``, on the top-level parser and on every command."""
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        # A subcommand's default must not undo a -v given before the subcommand.
        default=False if top_level else argparse.SUPPRESS,
        help="show library logs and full tracebacks",
    )


def add_model(parser: argparse.ArgumentParser) -> None:
    """Which LLaVA and tower, and how to load them."""
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


def add_generation(parser: argparse.ArgumentParser, batched: bool = True) -> None:
    """The prompt and how answers are generated."""
    group = parser.add_argument_group("generation")
    group.add_argument("--prompt", help="the question or instruction (default: a one-sentence caption)")
    group.add_argument("--system", help="system prompt, for the families that have one")
    group.add_argument("--max-new-tokens", type=positive_int, help="longest answer, in tokens")
    group.add_argument(
        "--temperature", type=_non_negative_float, help="0 (default) is greedy; above 0 samples"
    )
    group.add_argument("--top-p", type=float, help="nucleus sampling mass, when sampling")
    group.add_argument("--seed", type=_seed, help="random seed, for reproducible sampling")
    if batched:
        group.add_argument("--batch-size", type=positive_int, help="images per generate call")


def model_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The model flags, by ``ModelOptions`` field name (None where not given)."""
    return {name: getattr(args, name, None) for name in MODEL_FLAGS}


def generation_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The generation flags that were given, by ``GenerationOptions`` field name."""
    return {name: getattr(args, name) for name in GENERATION_FLAGS if getattr(args, name, None) is not None}


def resolved(args: argparse.Namespace) -> tuple[ModelOptions, GenerationOptions, str | None]:
    """The preset with the flags applied: checked before anything is loaded."""
    return resolve_options(args.preset, **model_overrides(args), **generation_overrides(args))
