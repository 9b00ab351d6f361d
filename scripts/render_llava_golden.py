"""Render golden LLaVA prompts with the ORIGINAL ``llava/conversation.py``.

safellava must feed LLaVA models exactly the prompts that the reference code
(haotian-liu/LLaVA, published on PyPI as ``llava-torch``) renders.  This script
imports that reference ``conversation.py`` and prints, as JSON on stdout, the
prompt each conversation mode renders for a few fixed cases, built the way
``llava/serve/cli.py`` and ``llava/eval/run_llava.py`` build them (image token
first: ``DEFAULT_IMAGE_TOKEN + "\\n" + query``, i.e. ``mm_use_im_start_end`` is
False; then ``append_message(roles[1], None)`` and ``get_prompt()``).

``llava-torch`` is only read here; it is never a dependency of safellava.

Regenerate ``tests/golden/llava_prompts.json``::

    pip download llava-torch --no-deps -d /tmp/llava_dl
    mkdir -p /tmp/llava_src && cd /tmp/llava_src
    unzip -q /tmp/llava_dl/llava_torch-*.whl   # a wheel; for an sdist: tar xzf
    cd -
    python scripts/render_llava_golden.py --llava-src /tmp/llava_src \\
        > tests/golden/llava_prompts.json

``--llava-src`` (or the ``LLAVA_SRC`` environment variable) is either the
folder that contains the ``llava`` package or the ``llava`` package folder
itself.  Without either, an installed ``llava`` package is located (its
``__init__`` is not run, as it imports torch).  Only ``conversation.py`` is
executed; it needs the standard library and Pillow, and a stub stands in for
Pillow when it is not installed (``get_prompt`` never touches images).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import re
import sys
import types
from pathlib import Path

DEFAULT_IMAGE_TOKEN = "<image>"  # llava/constants.py

MODES = ("llava_v1", "mistral_instruct", "chatml_direct", "llava_llama_2")

DESCRIBE = "Describe this image."
CAPTION = "Provide a one-sentence caption for the provided image."
CUSTOM_SYSTEM = "You are a careful assistant."
FIRST_ANSWER = "A cat on a mat."
FOLLOW_UP = "What colour is the cat?"


def _ensure_pil() -> None:
    """Install a stub ``PIL.Image`` when Pillow is missing."""
    try:
        import PIL.Image  # noqa: F401
    except ImportError:
        pil = types.ModuleType("PIL")
        image = types.ModuleType("PIL.Image")
        pil.Image = image
        sys.modules["PIL"] = pil
        sys.modules["PIL.Image"] = image


def _find_package_dir(src: str) -> Path:
    path = Path(src).expanduser().resolve()
    for candidate in (path, path / "llava"):
        if (candidate / "conversation.py").is_file():
            return candidate
    raise SystemExit(f"no llava/conversation.py under {path}")


def load_conversation(src: str | None) -> tuple[types.ModuleType, Path]:
    """Import the original ``conversation.py`` and return it with its path."""
    _ensure_pil()
    if src is None:
        # llava/__init__.py imports the torch model code, so locate the
        # installed package without running it and load only conversation.py.
        spec = importlib.util.find_spec("llava")
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit("llava is not installed; pass --llava-src or set LLAVA_SRC")
        src = next(iter(spec.submodule_search_locations))
    path = _find_package_dir(src) / "conversation.py"
    spec = importlib.util.spec_from_file_location("llava_conversation_golden", path)
    module = importlib.util.module_from_spec(spec)
    # dataclasses resolves annotations through sys.modules[module.__name__].
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module, path


def llava_version(package_dir: Path) -> str:
    """Read the llava-torch version next to the package (wheel or checkout)."""
    root = package_dir.parent
    for metadata in sorted(root.glob("llava_torch-*.dist-info/METADATA")) + sorted(
        root.glob("llava_torch-*/PKG-INFO")
    ):
        match = re.search(r"^Version: (\S+)$", metadata.read_text(), re.MULTILINE)
        if match:
            return match.group(1)
    pyproject = root / "pyproject.toml"
    if pyproject.is_file():
        match = re.search(r'^version\s*=\s*"([^"]+)"', pyproject.read_text(), re.MULTILINE)
        if match:
            return match.group(1)
    try:
        from importlib.metadata import version

        return version("llava-torch")
    except Exception:
        return "unknown"


def render(template, turns, system=None) -> str:
    """Copy ``template``, optionally replace its system, append turns, render."""
    conv = template.copy()
    if system is not None:
        conv.system = system
    for i, message in enumerate(turns):
        conv.append_message(conv.roles[i % 2], message)
    return conv.get_prompt()


def cases_for(template) -> dict[str, str]:
    first = DEFAULT_IMAGE_TOKEN + "\n" + DESCRIBE
    out = {
        "single_turn": render(template, [first, None]),
        "custom_system": render(template, [first, None], system=CUSTOM_SYSTEM),
        "empty_system": render(template, [first, None], system=""),
        "two_turn": render(template, [first, FIRST_ANSWER, FOLLOW_UP, None]),
        "single_turn_caption": render(template, [DEFAULT_IMAGE_TOKEN + "\n" + CAPTION, None]),
    }
    chatml_prefix = "<|im_start|>system\n"
    if template.system.startswith(chatml_prefix):
        # The ChatML system string carries its own header; keep it.
        out["custom_system_with_header"] = render(
            template, [first, None], system=chatml_prefix + CUSTOM_SYSTEM
        )
    return out


def template_fields(template) -> dict:
    return {
        "system": template.system,
        "roles": list(template.roles),
        "sep_style": template.sep_style.name,
        "sep": template.sep,
        "sep2": template.sep2,
        "version": template.version,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--llava-src",
        default=os.environ.get("LLAVA_SRC"),
        help="folder holding the llava package (default: $LLAVA_SRC, else an installed llava)",
    )
    parser.add_argument(
        "--modes",
        nargs="+",
        default=list(MODES),
        help="conv_templates keys to render (default: %(default)s)",
    )
    args = parser.parse_args(argv)

    module, path = load_conversation(args.llava_src)
    templates = module.conv_templates
    names: dict[int, str] = {}
    for name, value in vars(module).items():
        if isinstance(value, module.Conversation):
            names.setdefault(id(value), name)  # first binding: conv_vicuna_v1, not default_conversation
    # A tuple first message (gradio web server form) must render the same.
    for mode in args.modes:
        tuple_form = render(templates[mode], [(DESCRIBE + "\n" + DEFAULT_IMAGE_TOKEN, None, "Default"), None])
        assert tuple_form == cases_for(templates[mode])["single_turn"], mode

    result = {
        "meta": {
            "llava_version": llava_version(path.parent),
            "source_file": "llava/conversation.py",
            "source_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "aliases": {key: names[id(value)] for key, value in templates.items()},
            "templates": {mode: template_fields(templates[mode]) for mode in args.modes},
        },
        "prompts": {mode: cases_for(templates[mode]) for mode in args.modes},
    }
    json.dump(result, sys.stdout, indent=2, ensure_ascii=False)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
