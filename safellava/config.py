"""Presets and options as dataclasses; presets are YAML files in ``safellava/configs/``."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import UsageError
from .prompts import canonical_format

PRESET_DIR = Path(__file__).parent / "configs"
DEFAULT_PRESET = "llava-1.5-7b"
ORIGINAL_TOWER = "original"  # --vision-tower original: keep the checkpoint's own CLIP
SAFE_CLIP_336 = "aimagelab/safeclip_vit-l_14_336"
SAFE_CLIP_224 = "aimagelab/safeclip_vit-l_14"  # the paper's tower, for the LLaMA-2 lightning LLaVA

QUANTIZE_CHOICES = ("none", "4bit", "8bit")
DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")
DTYPE_CHOICES = ("auto", "float16", "bfloat16", "float32")
MAX_STOP_SEQUENCES = 4  # as the OpenAI API
MAX_PRESET_BYTES = 64 * 1024  # a preset is a few lines; anything bigger is not one


@dataclass
class GenerationOptions:
    """How captions are generated; 0 temperature means greedy decoding."""

    prompt: str = "Provide a one-sentence caption for the provided image."  # LLaVA's caption prompt
    max_new_tokens: int = 128  # upper bound on the caption length, in tokens
    temperature: float = 0.0  # 0 = greedy; > 0 samples
    top_p: float = 1.0  # nucleus sampling mass, used only when sampling
    seed: int | None = None  # set before each generate call, for reproducible sampling
    batch_size: int = 4  # images per generate call
    system: str | None = None  # system prompt, for the families that have one
    stop: tuple[str, ...] = ()  # up to 4 texts that end an answer where they appear (not included)

    def __post_init__(self) -> None:
        self.stop = tuple(self.stop)
        if len(self.stop) > MAX_STOP_SEQUENCES or not all(isinstance(t, str) and t for t in self.stop):
            raise UsageError(
                f"stop takes up to {MAX_STOP_SEQUENCES} non-empty texts, got {list(self.stop)!r}"
            )
        if self.max_new_tokens < 1:
            raise UsageError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise UsageError(f"temperature must be 0 (greedy) or positive, got {self.temperature}")
        if not 0 < self.top_p <= 1:  # also refuses nan
            raise UsageError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.batch_size < 1:
            raise UsageError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.seed is not None and not 0 <= self.seed < 2**32:
            raise UsageError(f"seed must be between 0 and 2**32 - 1, got {self.seed}")


@dataclass
class ModelOptions:
    """Which checkpoints to load and how: the LLaVA, the tower, quantization, device and dtype."""

    model: str = "llava-hf/llava-1.5-7b-hf"  # hub id or local folder of a llava-hf checkpoint
    vision_tower: str = SAFE_CLIP_336  # hub id or folder of a CLIP checkpoint, or "original"
    revision: str | None = None  # branch, tag or commit of the LLaVA hub repo
    tower_revision: str | None = None  # branch, tag or commit of the tower hub repo
    quantize: str = "none"  # none | 4bit | 8bit (bitsandbytes, language model only)
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    dtype: str = "auto"  # auto | float16 | bfloat16 | float32
    prompt_format: str = "auto"  # auto (the original's format) | llava_v1 | mistral_instruct | chatml_direct | llava_llama_2 | checkpoint
    # Pad to a square as the original does (LLaVA-1.5); False: centre crop as llava-hf.
    pad_images: bool = True

    def __post_init__(self) -> None:
        _check_choice("quantize", self.quantize, QUANTIZE_CHOICES)
        _check_choice("dtype", self.dtype, DTYPE_CHOICES)
        self.prompt_format = canonical_format(self.prompt_format)
        base, _, index = self.device.partition(":")
        if base not in DEVICE_CHOICES or (":" in self.device and (base != "cuda" or not index.isdigit())):
            raise UsageError(
                f"unknown device {self.device!r}: use one of {', '.join(DEVICE_CHOICES)} or cuda:N"
            )

    @property
    def uses_original_tower(self) -> bool:
        """True when the checkpoint's own (unsafe) CLIP tower is kept."""
        return self.vision_tower == ORIGINAL_TOWER


@dataclass
class Preset:
    """A named model setup: checkpoints, prompt format and generation defaults."""

    name: str
    model: ModelOptions = field(default_factory=ModelOptions)
    generation: GenerationOptions = field(default_factory=GenerationOptions)
    description: str = ""


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UsageError(f"unknown {name} {value!r}: use one of {', '.join(choices)}")


def available_presets() -> list[str]:
    """Names of the built-in presets."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _preset_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise UsageError(f"preset file {name_or_path} does not exist or is not a file")
        return path
    builtin = PRESET_DIR / f"{name_or_path}.yaml"
    if not builtin.is_file():
        raise UsageError(
            f"unknown preset {name_or_path!r}: use one of {', '.join(available_presets())} "
            "or a path to a .yaml file"
        )
    return builtin


def _from_mapping(cls: type, data: Any, where: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UsageError(f"{where} must be a mapping, got {type(data).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise UsageError(f"{where}: unknown keys {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    hints = typing.get_type_hints(cls)
    for key, value in data.items():
        if not _fits_type(value, hints[key]):
            shown = repr(value)
            shown = shown if len(shown) <= 60 else f"{shown[:57]}..."
            raise UsageError(f"{where}: {key} must be {_type_name(hints[key])}, got {shown}")
    try:
        return cls(**data)
    except TypeError as exc:
        raise UsageError(f"{where}: {exc}") from None


def _fits_type(value: Any, hint: Any) -> bool:
    """Whether a YAML value fits a field's type: str, int, float (ints too), a list of texts, or optional ones."""
    if typing.get_origin(hint) is tuple:
        return isinstance(value, list) and all(isinstance(item, str) for item in value)
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None:
        return type(None) in allowed
    if isinstance(value, bool):
        return bool in allowed
    if isinstance(value, int) and float in allowed:
        return True
    return any(isinstance(value, t) for t in allowed if t is not type(None))


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is tuple:
        return "a list of texts"
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    names = {
        str: "text",
        int: "a whole number",
        float: "a number",
        bool: "true or false",
        type(None): "empty",
    }
    return " or ".join(names.get(t, getattr(t, "__name__", str(t))) for t in allowed)


def _read_yaml(path: Path) -> Any:
    """A small YAML file without aliases: presets need none, and alias expansion has no bound."""
    import yaml

    class NoAliases(yaml.SafeLoader):
        def compose_node(self, parent: Any, index: Any) -> Any:
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                raise UsageError(
                    f"preset {path}: line {event.start_mark.line + 1}: YAML aliases (*{event.anchor}) "
                    "are not allowed in presets: write the value out"
                )
            return super().compose_node(parent, index)

    try:
        with path.open("rb") as file:
            raw = file.read(MAX_PRESET_BYTES + 1)
    except OSError as exc:
        raise UsageError(f"preset {path}: {exc.strerror or exc}") from None
    if len(raw) > MAX_PRESET_BYTES:
        raise UsageError(f"preset {path} is over {MAX_PRESET_BYTES // 1024} KiB: not a preset file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"preset {path} is not UTF-8 text: not a preset file") from None
    try:
        return yaml.load(text, Loader=NoAliases)
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else "invalid YAML"
        raise UsageError(f"preset {path}: {first}") from None


def load_preset(name_or_path: str = DEFAULT_PRESET) -> Preset:
    """Read a built-in preset by name, or a preset YAML file by path."""
    path = _preset_path(name_or_path)
    data = _read_yaml(path) or {}
    if not isinstance(data, dict):
        raise UsageError(f"preset {path} must be a YAML mapping")
    data = dict(data)
    name = str(data.pop("name", path.stem))
    description = str(data.pop("description", ""))
    generation = _from_mapping(GenerationOptions, data.pop("generation", None), f"preset {path}: generation")
    model = _from_mapping(ModelOptions, data, f"preset {path}")
    return Preset(name=name, model=model, generation=generation, description=description)


def override(options: Any, **changes: Any) -> Any:
    """A copy of a dataclass with the given fields replaced, skipping changes that are None."""
    known = {f.name for f in fields(options)}
    unknown = sorted(set(changes) - known)
    if unknown:
        raise UsageError(f"unknown option {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    return dataclasses.replace(options, **{k: v for k, v in changes.items() if v is not None})


def resolve_options(
    preset: str | Preset | None = None, **overrides: Any
) -> tuple[ModelOptions, GenerationOptions, str | None]:
    """A preset with the given overrides: model options, generation defaults and the preset's name.

    Giving ``model`` without a preset means another checkpoint than the default preset's: then no
    preset is named and the prompt format is detected rather than assumed.
    """
    chosen = preset if isinstance(preset, Preset) else load_preset(preset or DEFAULT_PRESET)
    model_fields = {f for f in ModelOptions.__dataclass_fields__}
    model_overrides = {k: v for k, v in overrides.items() if k in model_fields}
    generation_overrides = {k: v for k, v in overrides.items() if k not in model_fields}
    preset_name: str | None = chosen.name
    if model_overrides.get("model") is not None and preset is None:
        preset_name = None
        if model_overrides.get("prompt_format") is None:
            model_overrides["prompt_format"] = "auto"
    options: ModelOptions = override(chosen.model, **model_overrides)
    generation_options: GenerationOptions = override(chosen.generation, **generation_overrides)
    return options, generation_options, preset_name
