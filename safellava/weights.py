"""Find a checkpoint's weight files (hub id or folder) and open them lazily as one state dict."""

from __future__ import annotations

import json
import pickle
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from .errors import ModelLoadError, first_line, load_failure

PICKLE_REFUSED = (
    "it holds objects that are not plain tensors, and safellava never runs code from a checkpoint "
    "(it loads pickles with weights_only): use a safetensors checkpoint from a source you trust"
)
# In order of preference: safetensors (memory-mapped, no code execution), then PyTorch pickles.
_SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")
_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def _hub_file(repo: str, filename: str, revision: str | None, local_only: bool = False) -> str | None:
    from transformers.utils import cached_file

    try:
        return cached_file(
            repo,
            filename,
            revision=revision,
            local_files_only=local_only,
            _raise_exceptions_for_missing_entries=False,
        )
    except OSError as exc:
        raise ModelLoadError(f"cannot fetch {filename} from {repo}: {load_failure(repo, exc)}") from None


def resolve_weight_files(repo: str, revision: str | None = None, local_only: bool = False) -> list[Path]:
    """The weight files of a checkpoint, downloaded into the hub cache unless ``local_only``."""
    for index_name, single_name in zip(_INDEX_FILES, _SINGLE_FILES, strict=True):
        index = _hub_file(repo, index_name, revision, local_only)
        if index is not None:
            weight_map = json.loads(Path(index).read_text())["weight_map"]
            shards = sorted(set(weight_map.values()))
            files = [_hub_file(repo, shard, revision, local_only) for shard in shards]
            missing = [s for s, f in zip(shards, files, strict=True) if f is None]
            if missing:
                raise ModelLoadError(f"{repo}: weight shard {missing[0]} named in {index_name} is missing")
            return [Path(f) for f in files if f is not None]
        single = _hub_file(repo, single_name, revision, local_only)
        if single is not None:
            return [Path(single)]
    raise ModelLoadError(f"{repo} has no model weights (no model.safetensors or pytorch_model.bin)")


def _load_pickle(torch: Any, file: Path) -> dict[str, Any]:
    try:
        return torch.load(file, map_location="cpu", mmap=True, weights_only=True)
    except RuntimeError:  # files in the legacy (non-zip) format cannot be memory-mapped
        return torch.load(file, map_location="cpu", weights_only=True)


@contextmanager
def open_lazy_state_dict(files: list[Path]) -> Iterator[dict[str, Any]]:
    """Map checkpoint keys to lazily read tensors (safetensors slices or memory-mapped pickles)."""
    import torch
    from safetensors import SafetensorError, safe_open

    state: dict[str, Any] = {}
    with ExitStack() as stack:
        for file in files:
            try:
                if file.suffix == ".safetensors":
                    handle = stack.enter_context(safe_open(str(file), framework="pt", device="cpu"))
                    keys = handle.keys()  # a safetensors handle, not a dict
                    state.update((key, handle.get_slice(key)) for key in keys)
                else:
                    state.update(_load_pickle(torch, file))
            except pickle.UnpicklingError:
                raise ModelLoadError(f"cannot read weights {file}: {PICKLE_REFUSED}") from None
            except (SafetensorError, OSError, RuntimeError, ValueError, EOFError) as exc:
                raise ModelLoadError(f"cannot read weights {file}: {first_line(exc)}") from None
        yield state


def resolved_commit(repo: str, revision: str | None, filename: str = "config.json") -> str | None:
    """The commit a hub checkpoint resolved to (from its cache path), or None for a local folder."""
    from transformers.utils.hub import extract_commit_hash

    if Path(repo).is_dir():
        return None
    return extract_commit_hash(_hub_file(repo, filename, revision), None)


def missing_folder(source: str) -> bool:
    """True when ``source`` is written as a local path (not a hub id) and no such folder exists."""
    written_as_path = (
        source.startswith(("/", "./", "../", "~", ".\\")) or source.count("/") > 1 or "\\" in source
    )
    return written_as_path and not Path(source).expanduser().is_dir()
