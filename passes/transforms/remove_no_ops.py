"""RemoveNoOps: drop arithmetic that changes nothing (x·1, 1·x, x/1, x + 0, 0 + x, x − 0) in the main graph.

Converters write them: paddle2onnx exports Paddle's `scale` op as Mul(x, s) → Add(·, 0.0), so PP-OCR's
scaled query reaches Q·Kᵀ through an Add, and attention recognition, which looks through a scaling Mul to
the query's head split, stopped at it (its heads were never prunable). Only rank-0 constants count: they
cannot broadcast the other operand to another shape, so each match is an identity.

onnxscript's no-op rules do the same, but they also rewrite `If`/`Loop` branches (pcc never changes a
subgraph), and onnx_ir's IdentityEliminationPass, needed after them, raised on silero's `If` branches. So
the main graph's nodes are matched here directly.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

__all__ = ["RemoveNoOps"]

# op -> (its neutral constant, the input positions the other operand may take)
_NEUTRAL = {"Mul": (1, (0, 1)), "Add": (0, (0, 1)), "Div": (1, (0,)), "Sub": (0, (0,))}


def _operand_of_no_op(node: ir.Node) -> ir.Value | None:
    """The operand a no-op node passes through unchanged, or None."""
    if node.domain not in ("", "ai.onnx") or node.op_type not in _NEUTRAL or len(node.inputs) != 2:
        return None
    neutral, positions = _NEUTRAL[node.op_type]
    for position in positions:
        operand, other = node.inputs[position], node.inputs[1 - position]
        constant = None if other is None else ir.convenience.get_const_tensor(other)
        if operand is not None and constant is not None and constant.shape.dims == () and constant.numpy() == neutral:
            return operand
    return None


@dataclass
class RemoveNoOps(ir.passes.InPlacePass):
    """Transform: a main-graph Mul/Div by a scalar 1 or Add/Sub of a scalar 0 is replaced by its operand
    (unless its output is a graph output)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for node in list(model.graph):
            operand = _operand_of_no_op(node)
            if operand is None or node.outputs[0].is_graph_output() or operand.dtype != node.outputs[0].dtype:
                continue
            node.outputs[0].replace_all_uses_with(operand)
            model.graph.remove(node, safe=True)
            modified = True
        return ir.passes.PassResult(model, modified)
