"""StaticReshapeTargets: a Reshape whose target is built from the input's own batch size gets a constant target.

Exporting with a dynamic batch turns `x.view(x.size(0), -1)` into Shape -> Squeeze -> Concat -> Reshape:
the target is computed at run time, so the channel analysis must freeze everything through it (it cannot
rewrite a target it cannot see), and the last convolution before a classifier could never be pruned.
When every entry of such a target is either a constant or a dimension of some tensor that is provably
the same as the reshaped input's dimension at that position, the target is equivalent to a constant one
with 0 ("copy this dimension") in those positions; other known dimensions become their numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

__all__ = ["StaticReshapeTargets", "shape_entries"]

Entry = int | ir.SymbolicDim | None  # a known size, a named symbolic size, or unknown


def _attr(node: ir.Node, name: str, default):
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def _const_ints(value: ir.Value | None) -> list[int] | None:
    if value is None or value.const_value is None:
        return None
    return [int(v) for v in value.const_value.numpy().reshape(-1)]


def shape_entries(value: ir.Value) -> list[Entry] | None:
    """The 1-D integer tensor `value` as a list of sizes, followed through shape arithmetic (Shape, Gather,
    Slice, Concat, Mul of single sizes, and ops that keep the values); None if unknown.

    Exporters build Reshape targets this way (`x.view(x.size(0), -1)`), and so do converters for Flatten:
    paddle2onnx as `Concat(Slice(Shape(x), 0, 2), [-1])`, old torch exports with a `Mul` of two sizes."""
    if value.const_value is not None:
        array = value.const_value.numpy()
        return [int(v) for v in array.reshape(-1)] if array.ndim <= 1 and array.dtype.kind == "i" else None
    node = value.producer()
    if node is None:
        return None
    if node.op_type == "Shape":
        shape = node.inputs[0].shape
        if shape is None:
            return None
        return list(shape.dims)[slice(_attr(node, "start", 0), _attr(node, "end", len(shape)))]
    if node.op_type in ("Squeeze", "Unsqueeze", "Identity", "Cast") or (
        node.op_type == "Reshape" and shape_entries(node.inputs[1]) in ([-1], [1])
    ):
        return shape_entries(node.inputs[0])
    if node.op_type == "Concat" and _attr(node, "axis", 0) in (0, -1):
        parts = [shape_entries(v) for v in node.inputs]
        return None if any(p is None for p in parts) else [e for p in parts for e in p]
    if node.op_type == "Gather" and _attr(node, "axis", 0) == 0:
        data, indices = shape_entries(node.inputs[0]), _const_ints(node.inputs[1])
        return None if data is None or indices is None else [data[i] for i in indices]
    if node.op_type == "Slice":
        data = shape_entries(node.inputs[0])
        starts, ends = _const_ints(node.inputs[1]), _const_ints(node.inputs[2])
        axes = _const_ints(node.inputs[3]) if len(node.inputs) > 3 else [0]
        steps = _const_ints(node.inputs[4]) if len(node.inputs) > 4 else [1]
        if data is None or starts is None or ends is None or axes not in ([0], [-1]) or steps != [1]:
            return None
        return data[slice(starts[0], ends[0])]
    if node.op_type == "Mul":
        parts = [shape_entries(v) for v in node.inputs]
        if any(p is None or len(p) != 1 for p in parts):
            return None
        a, b = parts[0][0], parts[1][0]
        return [a * b if isinstance(a, int) and isinstance(b, int) else None]
    return None


def _static_target(x: ir.Value, entries: list[Entry], allowzero: int) -> np.ndarray | None:
    if x.shape is None:
        return None
    target = []
    for position, entry in enumerate(entries):
        if isinstance(entry, int):
            if entry == 0 and allowzero:
                return None  # a literal zero would change meaning once allowzero is dropped
            target.append(entry)
        elif (
            isinstance(entry, ir.SymbolicDim)
            and entry.value is not None
            and position < len(x.shape)
            and str(x.shape[position]) == entry.value
        ):
            target.append(0)  # the input's own dimension at this position
        else:
            return None
    return np.asarray(target, dtype=np.int64)


@dataclass
class StaticReshapeTargets(ir.passes.InPlacePass):
    """Transform: constant targets for Reshapes whose computed target only restates the batch size."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for node in list(model.graph):
            if node.op_type != "Reshape" or node.inputs[1].const_value is not None:
                continue
            entries = shape_entries(node.inputs[1])
            target = None if entries is None else _static_target(node.inputs[0], entries, _attr(node, "allowzero", 0))
            if target is None:
                continue
            constant = ir.Value(name=f"{node.name or 'reshape'}_static_target", const_value=ir.tensor(target))
            constant.shape, constant.type = ir.Shape([len(target)]), ir.TensorType(ir.DataType.INT64)
            model.graph.register_initializer(constant)
            node.replace_input_with(1, constant)
            node.attributes.pop("allowzero", None)
            modified = True
        if modified:
            common_passes.RemoveUnusedNodesPass()(model)
        return ir.passes.PassResult(model, modified)
