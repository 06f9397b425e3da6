"""PruneBlocks: drop whole residual blocks (transformer layers, ResNet blocks): x + f(x) → x.

Which blocks go: the ones named, or the `count` least influential, or the least influential until
`sparsity` of the blocks' parameters is gone (influence from `FindResidualBlocks` on calibration data).
Blocks are bypassed last-first, so a block whose input was a dropped block's output reads that block's
input instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from pcc.compiler.errors import InvalidRequestError
from pcc.passes.analysis.attention import AttentionBlocks
from pcc.passes.analysis.residual_blocks import ResidualBlock, ResidualBlocks
from pcc.passes.results import fetch, invalidate, store

__all__ = ["PruneBlocks", "BlockPruneReport"]


@dataclass
class BlockPruneReport:
    META_KEY = "pcc.block_prune_report"
    PRODUCED_BY = "PruneBlocks"

    removed: list[str]
    params_removed: int
    params_in_blocks: int

    def summary(self) -> str:
        share = self.params_removed / self.params_in_blocks if self.params_in_blocks else 0.0
        return (f"{len(self.removed)} blocks removed ({', '.join(self.removed) or 'none'}): "
                f"{self.params_removed} params, {100 * share:.1f}% of the blocks'")


def _choose(blocks: list[ResidualBlock], names, count, sparsity) -> list[ResidualBlock]:
    if names is not None:
        unknown = sorted(set(names) - {b.name for b in blocks})
        if unknown:
            raise InvalidRequestError(f"no residual block named {', '.join(unknown)}")
        return [b for b in blocks if b.name in names]
    if count is not None and not 0 <= count < len(blocks):
        raise InvalidRequestError(f"cannot remove {count} of {len(blocks)} residual blocks (at least one must stay)")
    if any(b.influence is None for b in blocks):
        raise InvalidRequestError("choosing blocks needs their influence: run FindResidualBlocks with calibration data")
    ranked = sorted(blocks, key=lambda b: b.influence)
    if count is not None:
        return ranked[:count]
    target, chosen, removed = sparsity * sum(b.params for b in blocks), [], 0
    for block in ranked[:-1]:  # never the last one standing
        if abs(removed + block.params - target) >= abs(removed - target):
            break
        chosen.append(block)
        removed += block.params
    return chosen


def _bypass(graph: ir.Graph, block: ResidualBlock) -> None:
    values = {v.name: v for node in graph for v in node.outputs}
    values.update((v.name, v) for v in graph.inputs)
    entry, exit_value = values[block.entry], values[block.exit]
    if exit_value in graph.outputs:  # keep the output's name: route the entry through an Identity
        identity = ir.node("Identity", [entry], name=f"{block.name}_bypass")
        out = identity.outputs[0]
        out.name, exit_value.name = exit_value.name, f"{exit_value.name}_dropped"
        out.shape, out.type = exit_value.shape, exit_value.type
        graph.append(identity)
        graph.outputs[graph.outputs.index(exit_value)] = out
    ir.convenience.replace_all_uses_with(exit_value, entry)


@dataclass
class PruneBlocks(ir.passes.InPlacePass):
    """Transform: bypass whole residual blocks (by name, by count, or by parameter `sparsity`)."""

    count: int | None = None
    sparsity: float | None = None
    names: tuple[str, ...] | None = None

    def requires(self, model: ir.Model) -> None:
        if sum(x is not None for x in (self.count, self.sparsity, self.names)) != 1:
            raise InvalidRequestError("PruneBlocks takes exactly one of names, count or sparsity")
        if self.sparsity is not None and not 0 <= self.sparsity < 1:
            raise InvalidRequestError(f"block sparsity must be in [0, 1), got {self.sparsity}")
        fetch(model, ResidualBlocks)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        blocks = fetch(model, ResidualBlocks).blocks
        if not blocks:
            raise InvalidRequestError(
                "block pruning needs residual blocks (an Add of x and a branch computed from x only), found none"
            )
        chosen = _choose(blocks, self.names, self.count, self.sparsity)
        order = {b.name: i for i, b in enumerate(blocks)}
        for block in sorted(chosen, key=lambda b: order[b.name], reverse=True):
            _bypass(model.graph, block)
        if chosen:
            common_passes.RemoveUnusedNodesPass()(model)  # the branches, and their weights
        invalidate(model, ResidualBlocks, AttentionBlocks)
        store(model, BlockPruneReport([b.name for b in chosen], sum(b.params for b in chosen), sum(b.params for b in blocks)))
        return ir.passes.PassResult(model, bool(chosen))
