"""The main job on a bundled example: export a ResNet-18 and prune half its parameters with `pcc compile`.

    python examples/quickstart.py [--sparsity 0.5] [--out out/]

Writes out/resnet18.onnx (random weights; no downloads), then runs
`pcc compile out/resnet18.onnx --sparsity 0.5 --target onnx -o out/resnet18.pruned.onnx --report out/`
and prints pcc's summary: parameters, MACs and onnxruntime latency before and after.
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import warnings
from pathlib import Path

import onnx_ir as ir

sys.path.insert(0, str(Path(__file__).resolve().parent))
import zoo  # noqa: E402

from pcc.compiler import from_torch  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsity", default="0.5")
    parser.add_argument("--out", type=Path, default=Path("out"))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)

    args.out.mkdir(parents=True, exist_ok=True)
    source = args.out / "resnet18.onnx"
    if not source.exists():
        print(f"exporting a ResNet-18 (random weights, 1x3x224x224) to {source} ...", flush=True)
        module, example = zoo.build("resnet18")
        ir.save(from_torch(module, (example,)), source)
    command = [
        "pcc", "compile", str(source), "--sparsity", args.sparsity, "--target", "onnx",
        "-o", str(args.out / "resnet18.pruned.onnx"), "--report", str(args.out),
    ]
    print("$ " + " ".join(command), flush=True)
    return subprocess.call(command)


if __name__ == "__main__":
    sys.exit(main())
