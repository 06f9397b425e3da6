"""InferMissingShapes: finish shape inference where onnx's own leaves a shape-preserving op unknown.

onnx's inference skips some function ops (GroupNormalization-21, for one) and ops of domains it has no
schema for. For the ops whose output has exactly their input's shape (activations, normalisations,
softmax-like ops), the shape is known anyway: it is copied from the input, in graph order, so that
channel analysis does not stop at a value whose shape was never in doubt.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

from pcc.passes.analysis.channel_rules import SHAPE_PRESERVING_OPS

__all__ = ["InferMissingShapes"]


@dataclass
class InferMissingShapes(ir.passes.InPlacePass):
    """Copy input 0's shape and type to output 0 of shape-preserving ops whose output has none."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for node in model.graph:
            if node.domain not in ("", "ai.onnx") or node.op_type not in SHAPE_PRESERVING_OPS:
                continue
            source, target = node.inputs[0], node.outputs[0]
            if target.shape is None and source is not None and source.shape is not None:
                target.shape = ir.Shape(list(source.shape))
                if target.dtype is None:
                    target.dtype = source.dtype
                modified = True
        return ir.passes.PassResult(model, modified)
