"""ShareTransposedWeights: store a weight once when the graph also reads it transposed.

A tied embedding and LM head (Llama, GPT-2 and most small LLMs) are one matrix E [vocab, hidden]: the
embedding Gathers its rows, the head multiplies by Transpose(E). FoldConstants turns every weight into a
plain initializer so that pruning can slice it, which stores Eᵀ as a second tensor; SmolLM2-135M's written
file grew by its 28M-entry head (21%). Before writing, a large initializer that equals another one's
transpose exactly is replaced by a Transpose node of that one again: onnxruntime folds it back at load.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

__all__ = ["ShareTransposedWeights"]

_MIN_ELEMENTS = 1 << 16  # smaller copies are not worth a node


def _matrices(graph: ir.Graph) -> list[tuple[ir.Value, np.ndarray]]:
    """The large 2-D initializers that are not graph inputs or outputs, with their arrays."""
    found = []
    for value in graph.initializers.values():
        tensor = value.const_value
        if tensor is None or len(tensor.shape) != 2 or tensor.size < _MIN_ELEMENTS:
            continue
        if value.is_graph_input() or value.is_graph_output():
            continue
        found.append((value, tensor.numpy()))
    return found


def _transposed_pairs(matrices: list[tuple[ir.Value, np.ndarray]]) -> list[tuple[ir.Value, ir.Value]]:
    """(copy, source) pairs where copy == sourceᵀ; each source is kept, each copy replaced once."""
    pairs, replaced = [], set()
    for i, (source, a) in enumerate(matrices):
        if source.name in replaced:
            continue
        for copy, b in matrices[i + 1 :]:
            if copy.name in replaced or b.shape != a.shape[::-1] or b.dtype != a.dtype:
                continue
            if np.array_equal(b[:, 0], a[0]) and np.array_equal(b, a.T):  # the first row rules out most pairs cheaply
                pairs.append((copy, source))
                replaced.add(copy.name)
    return pairs


@dataclass
class ShareTransposedWeights(ir.passes.InPlacePass):
    """Transform: an initializer equal to another's transpose becomes Transpose(that initializer)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        pairs = _transposed_pairs(_matrices(graph))
        for copy, source in pairs:
            node = ir.node("Transpose", [source], attributes={"perm": [1, 0]}, name=f"{copy.name}_shared")
            node.outputs[0].name = f"{copy.name}_shared"
            node.outputs[0].shape, node.outputs[0].dtype = copy.shape, copy.dtype
            graph.insert_before(next(iter(graph)), node)
            copy.replace_all_uses_with(node.outputs[0])
            graph.initializers.pop(copy.name)
        return ir.passes.PassResult(model, bool(pairs))
