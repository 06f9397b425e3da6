"""pcc's compiler core: import models into the IR, build and run pass pipelines.

    from pcc.compiler import load_onnx, channel_pruning_pipeline
    model = load_onnx("resnet.onnx")
    result = channel_pruning_pipeline(sparsity=0.5).run(model)

The names below load on first use: passes import `pcc.compiler.errors`, and an eager import of the
pipeline here would import those passes back while they are still half-initialised.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "PccError": "pcc.compiler.errors",
    "load_onnx": "pcc.compiler.frontend",
    "from_proto": "pcc.compiler.frontend",
    "from_torch": "pcc.compiler.frontend",
    "from_fx": "pcc.compiler.frontend",
    "Pipeline": "pcc.compiler.pipeline",
    "PipelineResult": "pcc.compiler.pipeline",
    "analysis_pipeline": "pcc.compiler.pipeline",
    "channel_pruning_pipeline": "pcc.compiler.pipeline",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pcc.compiler' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
