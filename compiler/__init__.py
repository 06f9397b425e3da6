"""pcc's compiler core: import models into the IR, build and run pass pipelines.

    from pcc.compiler import load_onnx, channel_pruning_pipeline
    model = load_onnx("resnet.onnx")
    result = channel_pruning_pipeline(sparsity=0.5).run(model)
"""

from pcc.compiler.errors import PccError
from pcc.compiler.frontend import from_fx, from_proto, from_torch, load_onnx
from pcc.compiler.pipeline import Pipeline, PipelineResult, analysis_pipeline, channel_pruning_pipeline

__all__ = [
    "PccError",
    "Pipeline",
    "PipelineResult",
    "analysis_pipeline",
    "channel_pruning_pipeline",
    "from_fx",
    "from_proto",
    "from_torch",
    "load_onnx",
]
