"""``--help`` answers without importing torch or transformers (a fact, not a timing)."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("torch", "transformers", "accelerate", "bitsandbytes", "PIL", "numpy", "yaml")

PROBE = """
import json, sys
from safellava.cli import build_parser, main
commands = [[]] + [[name] for name in build_parser()._subparsers._group_actions[0].choices]
for command in commands:
    try:
        main([*command, "--help"])
    except SystemExit as exc:
        assert exc.code == 0, (command, exc.code)
print(json.dumps({"commands": commands, "loaded": sorted(m for m in %r if m in sys.modules)}))
"""


def test_help_of_every_command_imports_nothing_heavy():
    result = subprocess.run(
        [sys.executable, "-c", PROBE % (HEAVY,)], capture_output=True, text=True, check=True
    )
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert ["caption"] in report["commands"]
    assert report["loaded"] == []


def test_importing_the_package_imports_nothing_heavy():
    probe = f"import sys, safellava; print([m for m in {HEAVY!r} if m in sys.modules])"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
