"""Option groups shared by the commands, and how parsed flags become library options."""

from __future__ import annotations

import argparse
import math
from typing import Any

from ..config import (
    DEFAULT_PRESET,
    DTYPE_CHOICES,
    ORIGINAL_TOWER,
    QUANTIZE_CHOICES,
    GenerationOptions,
    ModelOptions,
    available_presets,
    resolve_options,
)
from ..prompts import ALIASES, PROMPT_FORMATS

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
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a number, 0 or more, got {text}")
    return value


def _probability(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be above 0 and at most 1, got {text}")
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
        choices=(*PROMPT_FORMATS, *ALIASES),
        metavar="{" + ",".join(PROMPT_FORMATS) + "}",
        help="auto (default): the conversation template the model was trained with, as LLaVA's own code "
        "renders it; checkpoint: the checkpoint's chat template",
    )
    group.add_argument(
        "--no-pad",
        dest="pad_images",
        action="store_false",
        default=None,
        help="LLaVA-1.5: centre-crop images as the llava-hf processor does, instead of padding them to a "
        "square as LLaVA itself does",
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
    group.add_argument("--top-p", type=_probability, help="nucleus sampling mass, when sampling")
    group.add_argument("--seed", type=_seed, help="random seed, for reproducible sampling")
    if batched:
        group.add_argument("--batch-size", type=positive_int, help="images per generate call")


def add_backend(parser: argparse.ArgumentParser) -> None:
    """``--backend``: transformers' generate (default) or vLLM's engine on the cached export."""
    parser.add_argument(
        "--backend",
        choices=("transformers", "vllm"),
        default="transformers",
        help="transformers (default) or vllm: vLLM's engine on the safe model, exported once into the cache",
    )


def add_show_prompt(parser: argparse.ArgumentParser) -> None:
    """``--show-prompt``: each prompt text, exactly as it goes to the tokenizer, on stderr."""
    parser.add_argument(
        "--show-prompt",
        action="store_true",
        help='before generating, write each exact prompt text to stderr as one line: prompt: "..." (JSON)',
    )


def prompt_line(prompt: str) -> str:
    """How ``--show-prompt`` writes a prompt: one line, the text as a JSON string."""
    import json

    return "prompt: " + json.dumps(prompt, ensure_ascii=False)


def model_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The model flags, by ``ModelOptions`` field name (None where not given)."""
    return {name: getattr(args, name, None) for name in MODEL_FLAGS}


def generation_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The generation flags that were given, by ``GenerationOptions`` field name."""
    return {name: getattr(args, name) for name in GENERATION_FLAGS if getattr(args, name, None) is not None}


def resolved(args: argparse.Namespace) -> tuple[ModelOptions, GenerationOptions, str | None]:
    """The preset with the flags applied: checked before anything is loaded."""
    return resolve_options(args.preset, **model_overrides(args), **generation_overrides(args))
