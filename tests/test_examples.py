"""The documented examples run as written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_pass_manager_api_example_runs():
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "pass_manager_api.py")], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    assert "AllocateGlobal(sparsity=0.4, budget='params')" in done.stdout and "CheckerPass()" in done.stdout
    assert "removes" in done.stdout and "latency" in done.stdout
