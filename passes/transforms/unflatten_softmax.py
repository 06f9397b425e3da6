"""UnflattenSoftmax: undo the opset converter's Flatten → Softmax → Reshape around a last-axis softmax.

Before opset 13, Softmax(axis=a) normalised over all axes from `a` on (the input coerced to 2-D), so onnx's
version converter rewrites every such node as Flatten(axis=a) → Softmax(axis=1) → Reshape(·, Shape(x)) when
it lifts a model to opset 13. For a softmax over the last axis (every attention softmax) the two are the
same computation, but the wrapped form hides the attention core: PP-OCRv4's recogniser (paddle2onnx,
opset 12) showed no attention blocks. Where the flattened axes are exactly the last one, the three nodes are
replaced by one opset-13 Softmax(axis=-1); any other axis keeps the converter's form.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

__all__ = ["UnflattenSoftmax"]

_SOFTMAX_OPS = ("Softmax", "LogSoftmax")


def _only_user(value: ir.Value) -> ir.Node | None:
    users = {use.node for use in value.uses()}
    return users.pop() if len(users) == 1 and not value.is_graph_output() else None


def _is_shape_of(target: ir.Value, x: ir.Value) -> bool:
    """`target` is Shape(x), or a constant equal to x's static shape."""
    producer = target.producer()
    if producer is not None and producer.op_type == "Shape" and producer.inputs[0] is x and not producer.attributes:
        return True
    constant = ir.convenience.get_const_tensor(target)
    return (
        constant is not None and x.shape is not None and x.shape.is_static()
        and np.array_equal(constant.numpy(), np.asarray(x.shape.numpy()))
    )


def _flattened_last_axis_softmax(flatten: ir.Node) -> tuple[ir.Node, ir.Node] | None:
    """(softmax, reshape) when `flatten` is the converter's wrapper of a softmax over x's last axis, else None."""
    x = flatten.inputs[0]
    if x is None or x.shape is None:
        return None
    rank = len(x.shape)
    axis = flatten.attributes.get_int("axis", 1)
    if (axis + rank if axis < 0 else axis) != rank - 1:
        return None
    softmax = _only_user(flatten.outputs[0])
    if softmax is None or softmax.op_type not in _SOFTMAX_OPS or softmax.attributes.get_int("axis", -1) not in (1, -1):
        return None
    reshape = _only_user(softmax.outputs[0])
    if (
        reshape is None or reshape.op_type != "Reshape" or reshape.inputs[0] is not softmax.outputs[0]
        or reshape.outputs[0].is_graph_output()
    ):
        return None
    return (softmax, reshape) if _is_shape_of(reshape.inputs[1], x) else None


@dataclass
class UnflattenSoftmax(ir.passes.InPlacePass):
    """Transform: Flatten(x, axis=rank-1) → Softmax(axis=1) → Reshape(·, Shape(x)) becomes Softmax(x, axis=-1)
    (LogSoftmax alike), in the main graph. Needs x's rank (run after shape inference)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for flatten in list(model.graph):
            if flatten.op_type != "Flatten" or flatten.domain not in ("", "ai.onnx"):
                continue
            match = _flattened_last_axis_softmax(flatten)
            if match is None:
                continue
            softmax, reshape = match
            replacement = ir.node(
                softmax.op_type, [flatten.inputs[0]], attributes={"axis": -1}, name=softmax.name,
                outputs=[ir.Value(name=f"{softmax.outputs[0].name}_unflattened")],
            )
            result = replacement.outputs[0]
            result.shape, result.dtype = reshape.outputs[0].shape, reshape.outputs[0].dtype
            model.graph.insert_before(flatten, replacement)
            ir.convenience.replace_all_uses_with(reshape.outputs[0], result)
            shape_node = reshape.inputs[1].producer()
            model.graph.remove([reshape, softmax, flatten], safe=True)
            if shape_node is not None and not shape_node.outputs[0].uses():
                model.graph.remove(shape_node, safe=True)
            modified = True
        return ir.passes.PassResult(model, modified)
