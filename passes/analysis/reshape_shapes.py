"""InferReshapeShapes: give a Reshape whose target is computed at run time the output shape it must have.

Converters write Flatten as shape arithmetic: paddle2onnx as `Reshape(x, Concat(Slice(Shape(x), 0, 2), [-1]))`,
old torch exports as `Reshape(x, Concat(Unsqueeze(Gather(Shape(x), 0)), ..., Mul(...)))`. With a symbolic
axis in `x`, onnx's inference gives up on such a Reshape, so its output (and everything after it: the
Transpose of the flattened map, the classifier's MatMul) has no shape and the channel analysis refuses
the model. Yet the target is a list of known entries: numbers, the input's own dimensions, and one -1
whose size follows from the rest. This pass reads those entries through the shape arithmetic (one parser
with StaticReshapeTargets: `shape_entries`), writes the
output shape it implies (symbolic where it truly is), and lets onnx's inference carry it on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from pcc.passes.transforms.static_reshape_targets import Entry, shape_entries

__all__ = ["InferReshapeShapes"]

# Each round resolves the Reshapes whose input got a shape in the round before; models seen in the
# corpus need one or two.
_MAX_ROUNDS = 8


def _attr(node: ir.Node, name: str, default):
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def _same(a: Entry, b: int | ir.SymbolicDim) -> bool:
    if isinstance(a, int) or a is None:
        return a == b
    return isinstance(b, ir.SymbolicDim) and a.value is not None and a.value == b.value


def output_dims(in_dims: list[int | ir.SymbolicDim], entries: list[Entry], allowzero: int) -> list:
    """The Reshape's output dims: numbers, symbolic dims, or None where unknown."""
    dims: list = []
    for position, entry in enumerate(entries):
        if entry == 0 and not allowzero:
            entry = in_dims[position] if position < len(in_dims) else None
        dims.append(entry)
    if -1 in dims:
        # The input's dims that reappear unchanged cancel out of both products; what is left must be numbers.
        rest_in = list(in_dims)
        rest_out = []
        for dim in dims:
            match = next((i for i, d in enumerate(rest_in) if dim != -1 and _same(dim, d)), None)
            if match is not None:
                del rest_in[match]
            elif dim != -1:
                rest_out.append(dim)
        if all(isinstance(d, int) for d in rest_in + rest_out) and math.prod(rest_out) > 0:
            dims[dims.index(-1)] = math.prod(rest_in) // math.prod(rest_out)
        else:
            dims[dims.index(-1)] = None
    return dims


@dataclass
class InferReshapeShapes(ir.passes.InPlacePass):
    """Analysis: output shapes for Reshapes with computed targets, then onnx's inference downstream."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for _ in range(_MAX_ROUNDS):
            if not self._resolve(model.graph):
                break
            modified = True
            common_passes.ShapeInferencePass(strict_mode=False)(model)
        return ir.passes.PassResult(model, modified)

    @staticmethod
    def _resolve(graph: ir.Graph) -> bool:
        resolved = False
        for node in graph:
            if node.op_type != "Reshape" or node.domain not in ("", "ai.onnx") or node.outputs[0].shape is not None:
                continue
            x, target, y = node.inputs[0], node.inputs[1], node.outputs[0]
            if x.shape is None:
                continue
            entries = shape_entries(target)
            if entries is None:
                if target.shape is None or len(target.shape) != 1 or not isinstance(target.shape[0], int):
                    continue
                entries = [None] * target.shape[0]  # only the rank is known
            dims = output_dims(list(x.shape.dims), entries, _attr(node, "allowzero", 0))
            y.shape = ir.Shape([ir.SymbolicDim(None) if d is None else d for d in dims])
            if y.dtype is None:
                y.dtype = x.dtype
            resolved = True
        return resolved
