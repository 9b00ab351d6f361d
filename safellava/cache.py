"""safellava's own cache folder: tower fingerprints, keyed by the weight files they were computed from."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from .writers import atomic_write_text

FINGERPRINTS = "fingerprints.json"
MAX_ENTRIES = 256  # oldest entries go first; each is one line


def cache_dir() -> Path:
    """``$SAFELLAVA_CACHE``, else ``$XDG_CACHE_HOME/safellava``, else ``~/.cache/safellava``."""
    explicit = os.environ.get("SAFELLAVA_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "safellava"


def _identity(files: Sequence[Path], salt: str) -> str:
    parts = [salt]
    for file in files:
        stat = Path(file).stat()
        parts.append(f"{os.path.realpath(file)}|{stat.st_size}|{stat.st_mtime_ns}")
    return "\n".join(parts)


def cached_fingerprint(files: Sequence[Path], salt: str, compute: Callable[[], str]) -> str:
    """``compute()``, remembered for these exact files (path, size, mtime) and ``salt``."""
    key = _identity(files, salt)
    path = cache_dir() / FINGERPRINTS
    entries: dict[str, str] = {}
    with contextlib.suppress(OSError, ValueError):
        loaded = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(loaded, dict):
            entries = {str(k): str(v) for k, v in loaded.items()}
    if key in entries:
        return entries[key]
    value = compute()
    entries[key] = value
    kept = dict(list(entries.items())[-MAX_ENTRIES:])
    # A cache that cannot be written (read-only home) only costs the next run the same computation.
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(kept, indent=0) + "\n")
    return value
