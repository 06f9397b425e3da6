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


def _matrices(graph: ir.Graph) -> list[ir.Value]:
    """The large 2-D initializers that are not graph inputs or outputs."""
    return [
        value for value in graph.initializers.values()
        if value.const_value is not None and len(value.const_value.shape) == 2
        and value.const_value.size >= _MIN_ELEMENTS and not (value.is_graph_input() or value.is_graph_output())
    ]


def transposed_copies(graph: ir.Graph) -> list[tuple[ir.Value, ir.Value]]:
    """(copy, source) pairs of large 2-D initializers where copy == sourceᵀ exactly; each copy listed once.
    Arrays are read only for pairs of transposed shapes and dtypes (most weights have no such partner)."""
    matrices = _matrices(graph)
    pairs, replaced = [], set()
    for i, source in enumerate(matrices):
        if source.name in replaced:
            continue
        a_tensor = source.const_value
        for copy in matrices[i + 1 :]:
            b_tensor = copy.const_value
            if copy.name in replaced or b_tensor.shape.dims != a_tensor.shape.dims[::-1] or b_tensor.dtype != a_tensor.dtype:
                continue
            a, b = a_tensor.numpy(), b_tensor.numpy()
            if np.array_equal(b[:, 0], a[0]) and np.array_equal(b, a.T):  # the first row rules out most pairs cheaply
                pairs.append((copy, source))
                replaced.add(copy.name)
    return pairs
