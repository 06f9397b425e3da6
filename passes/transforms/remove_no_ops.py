"""RemoveNoOps: drop arithmetic that changes nothing (x·1, x + 0, x − 0, x / 1, inference Dropout).

Converters write them: paddle2onnx exports Paddle's `scale` op as Mul(x, s) → Add(·, 0.0), so PP-OCR's
scaled query reaches Q·Kᵀ through an Add, and attention recognition, which looks through a scaling Mul to
the query's head split, stopped at it (its heads were never prunable). onnxscript's no-op rules match
scalar constants only, which cannot broadcast a value to another shape, so each match is an identity.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnxscript.rewriter import rewrite
from onnxscript.rewriter.rules.common._no_op import rules as no_op_rules

__all__ = ["RemoveNoOps"]


@dataclass
class RemoveNoOps(ir.passes.InPlacePass):
    """Transform: onnxscript's no-op rules, then the Identity nodes they leave, except those a graph output needs."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        before = sum(1 for _ in model.graph)
        rewrite(model, pattern_rewrite_rules=no_op_rules)
        common_passes.IdentityEliminationPass()(model)
        return ir.passes.PassResult(model, sum(1 for _ in model.graph) != before)
