"""Every module imports on its own, first, in a fresh interpreter (no import cycles).

An import cycle among pcc's own modules only shows when a module is the first pcc module imported, so
each module is imported by a child that has loaded no pcc module. Starting one interpreter per module
cost ~5 s each (torch, tvm and torch-geometric load every time; 80+ modules); instead one interpreter
loads the third-party libraries once and forks a child per module. The children start with those
libraries in memory and no `pcc` module, which is the state the test is about.
"""

from __future__ import annotations

import json
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
THIRD_PARTY = (
    "numpy", "onnx", "onnx_ir", "onnxscript", "onnxruntime", "torch", "networkx", "tqdm", "matplotlib.pyplot", "tvm", "torch_geometric",
)

_FORK_EACH = r"""
import importlib, json, os, sys, traceback
for library in sys.argv[2:]:
    try:
        importlib.import_module(library)
    except ImportError:
        pass  # an optional library: a pcc module needing it fails below and says so
assert not [name for name in sys.modules if name == "pcc" or name.startswith("pcc.")]
errors = {}
for module in json.loads(sys.argv[1]):
    read, write = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(read)
        try:
            importlib.import_module(module)
            message = ""
        except BaseException:
            message = traceback.format_exc()
        os.write(write, message.encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        message = pipe.read().decode()
    _, status = os.waitpid(child, 0)
    if message or status:
        errors[module] = message or f"child exited with status {status}"
print(json.dumps(errors))
"""


@pytest.fixture(scope="module")
def import_errors() -> dict[str, str]:
    done = subprocess.run(
        [sys.executable, "-c", _FORK_EACH, json.dumps(MODULES), *THIRD_PARTY], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("module", MODULES)
def test_module_imports_first(module, import_errors):
    assert module not in import_errors, import_errors.get(module)


def test_a_cycle_is_caught(tmp_path):
    """The forked check must see what a fresh interpreter sees: two modules importing each other by name fail."""
    (tmp_path / "cycle_a.py").write_text("from cycle_b import B\nA = 1\n")
    (tmp_path / "cycle_b.py").write_text("from cycle_a import A\nB = 2\n")
    done = subprocess.run(
        [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(tmp_path)!r})\n{_FORK_EACH}", json.dumps(["cycle_a"]), "numpy"],
        capture_output=True, text=True, timeout=120,
    )
    errors = json.loads(done.stdout.strip().splitlines()[-1])
    assert "ImportError" in errors["cycle_a"]
