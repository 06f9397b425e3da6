"""Every module imports on its own, first, in a fresh interpreter (no import cycles)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"compiler": "pcc.compiler", "passes": "pcc.passes", "backends": "pcc.backends", "metanet": "pcc.metanet"}
MODULES = sorted(
    ".".join([PACKAGES[path.relative_to(ROOT).parts[0]], *path.relative_to(ROOT).with_suffix("").parts[1:]]).removesuffix(".__init__")
    for folder in PACKAGES
    for path in (ROOT / folder).rglob("*.py")
    if path.name != "__main__.py"
)


@pytest.mark.parametrize("module", MODULES)
def test_module_imports_first(module):
    done = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
