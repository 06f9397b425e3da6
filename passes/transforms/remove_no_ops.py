"""RemoveNoOps: drop arithmetic that changes nothing (x·1, x + 0, x − 0, x / 1, inference Dropout).

Converters write them: paddle2onnx exports Paddle's `scale` op as Mul(x, s) → Add(·, 0.0), so PP-OCR's
scaled query reaches Q·Kᵀ through an Add, and attention recognition, which looks through a scaling Mul to
the query's head split, stopped at it (its heads were never prunable). onnxscript's no-op rules match
scalar constants only, which cannot broadcast a value to another shape, so each match is an identity.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir
from onnxscript.rewriter import rewrite
from onnxscript.rewriter.rules.common._no_op import rules as no_op_rules

__all__ = ["RemoveNoOps"]


@dataclass
class RemoveNoOps(ir.passes.InPlacePass):
    """Transform: onnxscript's no-op rules, then the main graph's Identity nodes they leave (except one a
    graph output needs). onnx_ir's IdentityEliminationPass is not used: on a model with `If` branches
    (silero's VAD) it tried to make a branch's value an output of the main graph and raised."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        before = {id(node) for node in model.graph if node.op_type == "Identity"}
        rewrite(model, pattern_rewrite_rules=no_op_rules)
        modified = False
        for node in list(model.graph):
            if node.op_type != "Identity" or id(node) in before or node.outputs[0].is_graph_output():
                continue
            node.outputs[0].replace_all_uses_with(node.inputs[0])
            model.graph.remove(node, safe=True)
            modified = True
        return ir.passes.PassResult(model, modified)
