"""ShareTransposedWeights: store a weight once when the graph also reads it transposed.

FoldConstants stores a tied LM head as a second, transposed copy of the embedding
(`passes/analysis/transposed_weights.py`); SmolLM2-135M's written file grew by its 28M-entry head (21%).
Before writing, each such copy is replaced by a Transpose node of the weight it copies: onnxruntime folds
it back at load.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

from pcc.passes.analysis.transposed_weights import transposed_copies

__all__ = ["ShareTransposedWeights"]


@dataclass
class ShareTransposedWeights(ir.passes.InPlacePass):
    """Transform: an initializer equal to another's transpose becomes Transpose(that initializer)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        pairs = transposed_copies(graph)
        for copy, source in pairs:
            node = ir.node("Transpose", [source], attributes={"perm": [1, 0]}, name=f"{copy.name}_shared")
            node.outputs[0].name = f"{copy.name}_shared"
            node.outputs[0].shape, node.outputs[0].dtype = copy.shape, copy.dtype
            graph.insert_before(next(iter(graph)), node)
            copy.replace_all_uses_with(node.outputs[0])
            graph.initializers.pop(copy.name)
        return ir.passes.PassResult(model, bool(pairs))
