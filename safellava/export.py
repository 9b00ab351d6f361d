"""Write a merged checkpoint: the LLaVA with the Safe-CLIP weights in its tower, in the llava-hf hub layout.

Serving engines (vLLM, TGI, SGLang) are written against the llava-hf hub checkpoints, so the weights
are written under exactly those names (``vision_tower.vision_model.*``, ``multi_modal_projector.*``,
``language_model.model.*``, ``language_model.lm_head.*``, NeXT's ``image_newline``), in safetensors
shards with an index past the shard size, beside the config, the processor (``processor_config.json``
and ``preprocessor_config.json``), the chat template, a model card and ``safellava.json``.
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from . import __version__
from .config import ModelOptions
from .errors import UsageError, output_error
from .model import SafeLlava
from .weights import resolved_commit
from .writers import ordinary_mode

SAFE_CLIP_PAPER = "https://arxiv.org/abs/2311.16254"
SAFE_CLIP_LICENSE = "cc-by-nc-4.0"
DEFAULT_DTYPE = "float16"  # as the llava-hf checkpoints ship
MAX_SHARD_SIZE = "5GB"  # as the llava-hf checkpoints are sharded
WEIGHTS_INDEX = "model.safetensors.index.json"
PROVENANCE_FILE = "safellava.json"


def check_exportable(options: ModelOptions) -> None:
    """Refuse setups that have nothing to merge, cannot be written in full precision, or have no llava-hf form."""
    from .original import is_original_format, read_raw_config
    from .weights import missing_folder

    if options.quantize != "none":
        raise UsageError(
            f"cannot export a {options.quantize}-quantized model: export in float16 or bfloat16 "
            "and quantize when loading the export (--quantize works on it too)"
        )
    if options.uses_original_tower:
        raise UsageError("export writes the Safe-CLIP model: --vision-tower original has nothing to merge")
    raw = None if missing_folder(options.model) else read_raw_config(options.model, options.revision)
    if raw is not None and is_original_format(raw):
        if (raw.get("mm_projector_type") or "linear") == "linear":
            raise UsageError(
                f"{options.model} has a linear projector, which the llava-hf layout has no place for (its "
                "projector is two layers): safellava runs it as it is, but cannot export it"
            )
        if raw.get("mm_use_im_start_end"):
            raise UsageError(
                f"{options.model} wraps images in <im_start>/<im_end>, which llava-hf processors do not: "
                "safellava runs it as it is, but cannot export it"
            )


def check_target(out_dir: Path, force: bool, sources: tuple[str, ...] = ()) -> None:
    """Refuse a file, a folder holding a source or the cwd, and a non-empty folder unless it is an earlier
    export and ``force`` is given: nothing else is ever deleted."""
    resolved = out_dir.resolve()
    for source in (*sources, "."):
        source_path = Path(source).expanduser()
        if source_path.exists() and (
            resolved == source_path.resolve() or resolved in source_path.resolve().parents
        ):
            what = "the current folder" if source == "." else source
            raise UsageError(f"cannot export to {out_dir}: it holds {what}, which --force would delete")
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"{out_dir} is a file, not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not (out_dir / PROVENANCE_FILE).is_file():
            raise UsageError(
                f"{out_dir} is not empty and not an earlier export (no {PROVENANCE_FILE}): choose another "
                "folder (--force replaces only an earlier export)"
            )
        if not force:
            raise UsageError(f"{out_dir} holds an earlier export: pass --force to replace it")
    if not out_dir.parent.is_dir():
        raise UsageError(f"cannot export to {out_dir}: folder {out_dir.parent} does not exist")


def _base_license(repo: str, revision: str | None) -> str | None:
    """The ``license`` of a checkpoint's model card, where it has one."""
    from huggingface_hub import ModelCard
    from transformers.utils import cached_file

    try:
        card = cached_file(repo, "README.md", revision=revision, _raise_exceptions_for_missing_entries=False)
        return ModelCard.load(card).data.license if card else None
    except (OSError, ValueError):
        return None


def merged_tower_fingerprint(state: dict[str, Any], dtype: str) -> str:
    """The fingerprint of the tower as this export stores it (``dtype``), named as the tower's own weights."""
    import torch

    from .families import HF_TOWER_KEY
    from .vision import fingerprint, stock_tower_tensors

    target = getattr(torch, dtype)
    tensors = stock_tower_tensors(state, HF_TOWER_KEY)
    return fingerprint({name: tensor.detach().to("cpu", target) for name, tensor in tensors.items()})


def baked_tower(options: ModelOptions) -> dict[str, Any] | None:
    """What an exported model's ``safellava.json`` says it holds; None for any other checkpoint."""
    from transformers.utils import cached_file

    try:
        path = cached_file(
            options.model,
            PROVENANCE_FILE,
            revision=options.revision,
            _raise_exceptions_for_missing_entries=False,
        )
        data = json.loads(Path(path).read_text(encoding="utf-8")) if path else None
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("vision_tower"), str) else None


def provenance(loaded: SafeLlava, dtype: str) -> dict[str, Any]:
    """What ``safellava.json`` records: sources, revisions, tower fingerprint, versions."""
    options = loaded.options
    return {
        "safellava_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": options.model,
        "revision": options.revision,
        "model_commit": resolved_commit(options.model, options.revision),
        "vision_tower": options.vision_tower,
        "tower_revision": options.tower_revision,
        "tower_commit": resolved_commit(options.vision_tower, options.tower_revision),
        "tower_fingerprint": loaded.tower_fingerprint,
        "family": loaded.family.name,
        "prompt_format": loaded.prompt_format,
        "dtype": dtype,
    }


CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ title }} with the Safe-CLIP vision tower

This is `{{ base }}` with the weights of its CLIP vision tower replaced by those of the Safe-CLIP
encoder `{{ tower }}` (Poppi et al., *Safe-CLIP: Removing NSFW Concepts from Vision-and-Language
Models*, ECCV 2024, {{ paper }}), a CLIP fine-tuned so that NSFW visual concepts land in
safe regions of the embedding space. Nothing else changed: the projector and the language model are
the base model's. It was written by safellava {{ version }} in the llava-hf layout and loads with
plain transformers (`{{ model_class }}`, `AutoProcessor`) or any engine that serves llava-hf
checkpoints (vLLM, TGI, SGLang).

| | |
|---|---|
| base LLaVA | `{{ base }}` (revision `{{ revision }}`, commit `{{ model_commit }}`) |
| vision tower | `{{ tower }}` (revision `{{ tower_revision }}`, commit `{{ tower_commit }}`) |
| tower fingerprint | `{{ fingerprint }}` (sha256 of the tower's weights as its checkpoint stores them) |
| dtype | `{{ dtype }}` |

## Licences

The Safe-CLIP weights are licensed **CC BY-NC 4.0** (non-commercial): this merged model is too.
The rest of the weights keep the base model's licence: {{ base_license }}. Use of the model must
respect both.
"""


def model_card(info: dict[str, Any], base_license: str | None, model_class: str) -> str:
    """README.md for the exported folder: what it is, where it comes from, under which licences."""
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(
        license="other",
        license_name=f"{SAFE_CLIP_LICENSE}-and-base-model-license",
        base_model=[info["model"], info["vision_tower"]],
        tags=["llava", "safe-clip", "image-to-text"],
        pipeline_tag="image-text-to-text",
    )
    card = ModelCard.from_template(
        data,
        template_str=CARD_TEMPLATE,
        title=Path(info["model"]).name,
        base=info["model"],
        tower=info["vision_tower"],
        paper=SAFE_CLIP_PAPER,
        version=info["safellava_version"],
        model_class=model_class,
        revision=info["revision"] or "default",
        model_commit=info["model_commit"] or "local folder",
        tower_revision=info["tower_revision"] or "default",
        tower_commit=info["tower_commit"] or "local folder",
        fingerprint=info["tower_fingerprint"],
        dtype=info["dtype"],
        base_license=f"`{base_license}`" if base_license else "see the base model's card",
    )
    return str(card)


def hub_state_dict(loaded: SafeLlava) -> dict[str, Any]:
    """The model's tensors under their llava-hf hub names (not yet cast)."""
    return {loaded.family.hub_key(key): tensor for key, tensor in loaded.model.state_dict().items()}


def write_weights(state: dict[str, Any], folder: Path, dtype: str, max_shard_size: int | str) -> list[str]:
    """safetensors shards of ``state`` in ``dtype``, with an index when there is more than one; the file names."""
    import torch
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    target = getattr(torch, dtype)
    split = split_torch_state_dict_into_shards(state, max_shard_size=max_shard_size)
    for filename, names in split.filename_to_tensors.items():
        seen: set[int] = set()
        shard = {}
        for name in names:
            tensor = state[name].detach().to("cpu", target).contiguous()
            if tensor.data_ptr() in seen:  # tied weights: safetensors stores each tensor on its own
                tensor = tensor.clone()
            seen.add(tensor.data_ptr())
            shard[name] = tensor
        save_file(shard, str(folder / filename), metadata={"format": "pt"})
        del shard
    if split.is_sharded:
        index = {
            "metadata": {"total_size": _total_bytes(state, target)},
            "weight_map": split.tensor_to_filename,
        }
        (folder / WEIGHTS_INDEX).write_text(
            json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )
    return sorted(split.filename_to_tensors)


def _total_bytes(state: dict[str, Any], dtype: Any) -> int:
    import torch

    size = torch.empty((), dtype=dtype).element_size()
    return sum(tensor.numel() * size for tensor in state.values())


def write_processor(processor: Any, folder: Path) -> None:
    """The processor as the llava-hf repos ship it: tokenizer, processor and image processor configs, template."""
    processor.save_pretrained(folder)
    processor.image_processor.save_pretrained(folder)  # preprocessor_config.json, which engines read
    if getattr(processor, "chat_template", None):
        (folder / "chat_template.json").write_text(
            json.dumps({"chat_template": processor.chat_template}, indent=2) + "\n", encoding="utf-8"
        )


VOCAB_MULTIPLE = 64  # the llava-hf conversions pad the vocabulary to a multiple of 64


def _llava_hf_parts(loaded: SafeLlava, state: dict[str, Any]) -> tuple[Any, Any]:
    """The config and processor of the export, and ``state`` completed, in the llava-hf form.

    The processor carries the original's conversation format as its chat template (unless the model
    runs with ``--prompt-format checkpoint``). An original-format checkpoint gets what llava-hf
    conversions add: ``<image>`` and ``<pad>`` tokens, the vocabulary padded to a multiple of 64
    (new rows of the embeddings and the head are the mean of the existing ones, so a new token is
    never the most likely one), and a ``LlavaProcessor``.
    """
    import torch

    from .chat_templates import CHAT_TEMPLATES
    from .families import ORIGINAL

    config = copy.deepcopy(loaded.model.config)
    config.architectures = [loaded.family.model_class]
    if hasattr(config, "original"):
        del config.original
    template = CHAT_TEMPLATES.get(loaded.prompt_format, getattr(loaded.processor, "chat_template", None))
    if loaded.family is not ORIGINAL:
        processor = copy.deepcopy(loaded.processor)
        processor.chat_template = template
        return config, processor
    from transformers import LlavaProcessor

    tokenizer = copy.deepcopy(loaded.processor.tokenizer)
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    size = -(-len(tokenizer) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    for name in ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight"):
        weight = state[name]
        extra = weight.float().mean(dim=0, keepdim=True).to(weight.dtype).expand(size - weight.shape[0], -1)
        state[name] = torch.cat([weight, extra])
    config.text_config.vocab_size = size
    config.text_config.pad_token_id = tokenizer.pad_token_id
    config.image_token_index = tokenizer.convert_tokens_to_ids("<image>")
    processor = LlavaProcessor(
        image_processor=loaded.processor.image_processor,
        tokenizer=tokenizer,
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1,
        chat_template=template,
    )
    return config, processor


def _ordinary_permissions(folder: Path) -> None:
    """Give the staged folder and files the modes a plain mkdir/open would have (mkdtemp's are 0700)."""
    folder.chmod(ordinary_mode(directory=True))
    for path in folder.rglob("*"):
        path.chmod(ordinary_mode(directory=path.is_dir()))


def export(
    loaded: SafeLlava,
    out_dir: str | Path,
    force: bool = False,
    dtype: str = DEFAULT_DTYPE,
    max_shard_size: int | str = MAX_SHARD_SIZE,
) -> Path:
    """Save the merged model (in ``dtype``), processor, model card and ``safellava.json`` into ``out_dir``.

    Everything is written into a temporary folder beside the target and renamed at the end, so an
    interrupted export leaves no target folder behind.
    """
    check_exportable(loaded.options)
    if dtype not in ("float16", "bfloat16", "float32"):
        raise UsageError(f"cannot export in {dtype}: use float16, bfloat16 or float32")
    target = Path(out_dir).absolute()
    check_target(target, force, (loaded.options.model, loaded.options.vision_tower))
    info = provenance(loaded, dtype)
    state = hub_state_dict(loaded)
    info["merged_tower_fingerprint"] = merged_tower_fingerprint(state, dtype)
    config, processor = _llava_hf_parts(loaded, state)
    config.dtype = dtype
    try:
        return _write_export(loaded, info, state, config, processor, target, dtype, max_shard_size)
    except OSError as exc:
        raise output_error(target, exc, "choose another OUT_DIR") from None


def _write_export(
    loaded: SafeLlava,
    info: dict[str, Any],
    state: dict[str, Any],
    config: Any,
    processor: Any,
    target: Path,
    dtype: str,
    max_shard_size: Any,
) -> Path:
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        config.save_pretrained(staging)
        loaded.model.generation_config.save_pretrained(staging)
        write_weights(state, staging, dtype, max_shard_size)
        write_processor(processor, staging)
        (staging / PROVENANCE_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        card = model_card(
            info, _base_license(loaded.options.model, loaded.options.revision), loaded.family.model_class
        )
        (staging / "README.md").write_text(card, encoding="utf-8")
        _ordinary_permissions(staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target
