"""What to tell a user whose model is quantized: pcc prunes float graphs, and quantization ops stop it.

Quantize/DequantizeLinear pairs (onnxruntime's QDQ format) or integer ops sit between every pair of float
ops, so no channel group or attention core is found through them. Both refusals that meet such a model
(nothing to prune, no attention) end with the same hint, from here.
"""

from __future__ import annotations

import onnx_ir as ir

__all__ = ["QUANTIZATION_OPS", "quantized_model_hint"]

QUANTIZATION_OPS = frozenset(
    ("QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "MatMulInteger", "ConvInteger")
)


def quantized_model_hint(model: ir.Model) -> str:
    """"; the model is quantized (...): prune the float model, then quantize the result", naming one of its
    quantization nodes, or "" for a float model."""
    quantized = [node for node in model.graph if node.op_type in QUANTIZATION_OPS]
    if not quantized:
        return ""
    return (f"; the model is quantized ({len(quantized)} quantization ops stop the channels, e.g. {quantized[0].op_type} "
            f"'{quantized[0].name}'): prune the float model, then quantize the result")
