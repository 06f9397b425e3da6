"""CascadeHeads: SpAtten's dynamic (input-dependent) cascade head pruning, as ordinary ONNX ops.

Unlike `PruneHeads` through the dependency groups, which removes the same heads for every input and
shrinks the weights, cascade head pruning decides per input at run time. After layer l's attention, head
m's score grows by the magnitude of its output, the sum over queries and dims of |E[m, i, d]| (SpAtten,
HPCA'21), accumulated across layers. In a later layer only the top-k heads by accumulated score compute
their attention (Q·Kᵀ, softmax, probabilities·V): the heads' Q, Kᵀ and V are gathered before the core and
their outputs scattered back into an all-zero [batch, heads, queries, dim] tensor before the heads are
merged, so the output projection sees pruned heads as zeros. A pruned head stays pruned for every later
layer (head m of every layer is one identity, as SpAtten treats it). The projections still compute every
head: what shrinks is the attention core, whose cost grows with the sequence length squared.

Schedule: SpAtten's, no head pruning in the first ceil(30%) of the layers, then a ramp averaging to the
target, k = max(1, floor(H x keep)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from pcc.compiler.errors import InvalidRequestError
from pcc.passes.analysis.attention import AttentionBlocks, AttentionCore, find_attention_cores
from pcc.passes.results import fetch, invalidate, store
from pcc.passes.transforms.prune_tokens import GraphBuilder, resolve_cascade_schedule

__all__ = ["CascadeHeads", "CascadeHeadsReport"]

HEADS_UNPRUNED = 0.3  # SpAtten prunes no heads in the first 30% of the layers


@dataclass
class CascadeHeadsReport:
    META_KEY = "pcc.cascade_heads_report"
    PRODUCED_BY = "CascadeHeads"

    heads: int
    kept: list[int]  # heads computed in each attention layer

    @property
    def sparsity(self) -> float:
        return 1 - float(np.mean(self.kept)) / self.heads

    def summary(self) -> str:
        return (f"heads computed per layer (of {self.heads}, chosen per input): {' '.join(map(str, self.kept))}; "
                f"average removed {100 * self.sparsity:.1f}%")


def _checked_heads(cores: list[AttentionCore]) -> int:
    counts = set()
    for core in cores:
        operands = (core.scores.inputs[0], core.scores.inputs[1], core.context.inputs[1], core.context.outputs[0])
        shapes = [v.shape for v in operands]
        if any(s is None or len(s) != 4 or not isinstance(s[1], int) for s in shapes) or len({s[1] for s in shapes}) != 1:
            raise InvalidRequestError(
                f"cascade head pruning needs [batch, heads, ...] attention operands; {core.softmax.name} has {shapes}"
            )
        counts.add(shapes[0][1])
    if len(counts) != 1:
        raise InvalidRequestError(f"cascade head pruning needs one head count in every layer, found {sorted(counts)}")
    return counts.pop()


def _forget_head_count(core: AttentionCore) -> None:
    """The core's values (scores to context) now hold the kept heads only: drop their stale static shapes."""
    stack, seen = [core.scores], set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        for out in node.outputs:
            out.shape = None
            # past the softmax only the context is the core's: other readers of the probabilities (token
            # pruning's score sums) already reduce the head axis away and keep their shapes
            if node is core.softmax:
                stack.extend((*core.guard, core.context))
            elif node is not core.context:
                stack.extend(use.node for use in out.uses())


@dataclass
class CascadeHeads(ir.passes.InPlacePass):
    """Transform: dynamic cascade head pruning removing `sparsity` of the heads' attention work on average
    over the layers, or with an explicit non-increasing per-layer `keep` (fractions of the heads)."""

    sparsity: float | None = None
    keep: tuple[float, ...] | None = None
    expose_heads: bool = False  # add an output `kept_heads`: the heads the last layer computed, per input
    report: CascadeHeadsReport | None = field(default=None, init=False)

    def requires(self, model: ir.Model) -> None:
        if (self.sparsity is None) == (self.keep is None):
            raise InvalidRequestError("CascadeHeads takes exactly one of sparsity or keep")
        fetch(model, AttentionBlocks)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        cores = find_attention_cores(model)
        if not cores:
            raise InvalidRequestError("cascade head pruning needs multi-head attention, but the model has no attention core")
        heads = _checked_heads(cores)
        keep = resolve_cascade_schedule(self.keep, self.sparsity, len(cores), HEADS_UNPRUNED, "head")
        counts = [max(1, math.floor(heads * k)) for k in keep]
        changed = counts[-1] < heads
        if changed or self.expose_heads:
            self._rewrite(model, cores, counts, heads)
            common_passes.RemoveUnusedNodesPass()(model)
            common_passes.TopologicalSortPass()(model)
        invalidate(model, AttentionBlocks)
        self.report = CascadeHeadsReport(heads, counts)
        store(model, self.report)
        return ir.passes.PassResult(model, changed)

    def _rewrite(self, model: ir.Model, cores: list[AttentionCore], counts: list[int], heads: int) -> None:
        build = GraphBuilder(model.graph, "pcc_heads")
        first = cores[0].scores.inputs[0]
        batch = build.op("Gather", [build.op("Shape", [first]), build.const([0])], axis=0)
        kept = build.op("Expand", [build.const([np.arange(heads)]), build.op("Concat", [batch, build.const([1])], axis=0)])
        scores = None
        for index, (core, count) in enumerate(zip(cores, counts)):
            if count < (counts[index - 1] if index else heads):
                survivors = build.top_in_order(scores, build.const([count]))
                kept = build.gather_tokens(kept, survivors, 2, 1, 0)
                scores = build.gather_tokens(scores, survivors, 2, 1, 0)
            context = core.context.outputs[0]
            if count < heads:
                uses, values = list(context.uses()), core.context.inputs[1]
                for node, position in ((core.scores, 0), (core.scores, 1), (core.context, 1)):
                    operand = node.inputs[position]
                    node.replace_input_with(position, build.gather_tokens(operand, kept, 4, 1, 0))
                zero = np.zeros(1, dtype=context.dtype.numpy() if context.dtype else np.float32)
                full = build.op("ConstantOfShape", [build.op("Shape", [values])], value=ir.tensor(zero))  # every head's V shape
                index_shape = build.op("Shape", [context])
                spread = build.op("Expand", [build.op("Unsqueeze", [kept, build.const([2, 3])]), index_shape])
                merged = build.op("ScatterElements", [full, spread, context], axis=1)
                for use in uses:
                    use.node.replace_input_with(use.idx, merged)
                _forget_head_count(core)
            if index + 1 < len(cores) and any(c < count for c in counts[index + 1 :]):
                magnitude = build.op("ReduceSum", [build.op("Abs", [context]), build.const([2, 3])], keepdims=0)
                scores = magnitude if scores is None else build.op("Add", [scores, magnitude])
        if self.expose_heads:
            kept.name, kept.dtype = "kept_heads", ir.DataType.INT64
            kept.shape = ir.Shape([ir.SymbolicDim(None), counts[-1]])
            model.graph.outputs.append(kept)
