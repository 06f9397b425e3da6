"""Backends lower a pruned IR model to something that runs.

`TARGETS` maps each `--target` name to its backend; only implemented targets are listed, so the
command line names exactly the ones that work.
"""

from pcc.backends.onnx import OnnxTarget
from pcc.backends.spatten import SpAttenTarget
from pcc.backends.tvm import TvmTarget

__all__ = ["TARGETS"]

TARGETS = {"onnx": OnnxTarget, "spatten": SpAttenTarget, "tvm": TvmTarget}
