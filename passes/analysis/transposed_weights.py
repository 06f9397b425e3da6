"""Which weights are stored twice: an initializer that equals another one's transpose.

A tied embedding and LM head (Llama, GPT-2 and most small LLMs) are one matrix E [vocab, hidden]: the
embedding Gathers its rows, the head multiplies by Transpose(E). FoldConstants turns every weight into a
plain initializer so that pruning can slice it, which stores Eᵀ a second time. The parameter count counts
such a copy once, and the writer stores it once (`ShareTransposedWeights`).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

__all__ = ["transposed_copies"]

_MIN_ELEMENTS = 1 << 16  # smaller copies are left alone: not worth a node, and they hardly change a count


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


def transposed_copies(graph: ir.Graph) -> list[tuple[ir.Value, ir.Value]]:
    """(copy, source) pairs of large 2-D initializers where copy == sourceᵀ exactly; each copy listed once."""
    matrices = _matrices(graph)
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
