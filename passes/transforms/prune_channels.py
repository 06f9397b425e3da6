"""PruneChannels: remove the allocated units for real.

Weights are sliced along every prunable axis, attributes and shape constants that encode channel
counts are rewritten by the op's rule (Conv `group`, Reshape targets, Split sizes, Slice bounds, Gather
indices...), and every tensor's recorded shape shrinks, so the model stays valid and sorted with no
masks or extra ops at run time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from pcc.passes.allocation.allocation import Allocation
from pcc.passes.analysis.channel_rules import rule_for
from pcc.passes.analysis.dependency_groups import DependencyGroups
from pcc.passes.analysis.importance import Importance
from pcc.passes.results import fetch, invalidate, store

__all__ = ["PruneChannels", "PruneReport", "prune_channels", "pruned_copy"]


@dataclass
class PruneReport:
    """What `PruneChannels` did."""

    META_KEY = "pcc.prune_report"
    PRODUCED_BY = "PruneChannels"

    units_removed: int
    groups_pruned: int
    groups_total: int
    tensors_resized: int
    rewritten_nodes: list[str] = field(default_factory=list)
    cross_channel_norm_groups: list[int] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"removed {self.units_removed} units in {self.groups_pruned}/{self.groups_total} groups, "
            f"resized {self.tensors_resized} tensors, rewrote {len(self.rewritten_nodes)} nodes"
        )


class _Rewriter:
    """The `RewriteContext` rules use to update attributes and constants."""

    def __init__(self, graph: ir.Graph, kept: dict[tuple[str, int], np.ndarray]) -> None:
        self.graph = graph
        self._kept = kept
        self._taken = {v.name for v in _all_values(graph)}
        self.rewritten: list[str] = []

    def kept(self, value: ir.Value, axis: int) -> np.ndarray | None:
        if axis < 0:
            axis += len(value.shape)
        return self._kept.get((value.name, axis))

    def const(self, value: ir.Value | None) -> np.ndarray | None:
        if value is None or value.const_value is None:
            return None
        return value.const_value.numpy()

    def replace_input(self, node: ir.Node, index: int, array: np.ndarray) -> None:
        old = node.inputs[index]
        base = f"{old.name if old is not None else node.name}_pruned"
        name, n = base, 1
        while name in self._taken:
            name, n = f"{base}_{n}", n + 1
        self._taken.add(name)
        value = ir.Value(name=name, const_value=ir.tensor(np.ascontiguousarray(array), name=name))
        value.shape = ir.Shape(array.shape)
        value.dtype = value.const_value.dtype
        self.graph.register_initializer(value)
        node.replace_input_with(index, value)
        if node.name not in self.rewritten:
            self.rewritten.append(node.name)


def _all_values(graph: ir.Graph):
    yield from graph.inputs
    yield from graph.initializers.values()
    for node in graph:
        yield from (v for v in node.outputs if v is not None)


def prune_channels(model: ir.Model, groups: DependencyGroups, removed: np.ndarray) -> PruneReport:
    """Remove the units marked in `removed` (one bool per unit of `groups`) from `model`, in place."""
    graph = model.graph
    kept = groups.kept_indices(removed)
    rewriter = _Rewriter(graph, kept)
    for node in list(graph):
        rule = rule_for(node)
        if rule is not None and rule.rewrite is not None:
            rule.rewrite(rewriter, node)

    by_value: dict[str, list[tuple[int, np.ndarray]]] = {}
    for (name, axis), indices in kept.items():
        by_value.setdefault(name, []).append((axis, indices))
    values = {v.name: v for v in _all_values(graph)}
    for name, cuts in by_value.items():
        _shrink(values[name], cuts)

    pruned_groups = [g for g in groups.groups if removed[g.units].any()]
    common_passes.RemoveUnusedNodesPass()(model)  # drops the constants the rewrites replaced
    return PruneReport(
        units_removed=int(removed.sum()),
        groups_pruned=len(pruned_groups),
        groups_total=len(groups.groups),
        tensors_resized=len(by_value),
        rewritten_nodes=rewriter.rewritten,
        cross_channel_norm_groups=[g.index for g in pruned_groups if g.cross_channel_norm],
    )


def _shrink(value: ir.Value, cuts: list[tuple[int, np.ndarray]]) -> None:
    if value.const_value is not None:
        array = value.const_value.numpy()
        for axis, indices in cuts:
            array = np.take(array, indices, axis=axis)
        value.const_value = ir.tensor(np.ascontiguousarray(array), name=value.name)
        value.shape = ir.Shape(array.shape)
        return
    dims = list(value.shape)
    for axis, indices in cuts:
        dims[axis] = len(indices)
    value.shape = ir.Shape(dims)


def pruned_copy(model: ir.Model, groups: DependencyGroups, removed: np.ndarray) -> ir.Model:
    """A pruned clone, for measuring variants; `model` is left as it is (tensors are never edited in place)."""
    copy = model.clone()
    prune_channels(copy, groups, removed)
    return copy


@dataclass
class PruneChannels(ir.passes.InPlacePass):
    """Transform: physically remove the units of the stored `Allocation` (stores `PruneReport`)."""

    def requires(self, model: ir.Model) -> None:
        fetch(model, DependencyGroups)
        fetch(model, Allocation)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        report = prune_channels(model, fetch(model, DependencyGroups), fetch(model, Allocation).removed)
        invalidate(model, DependencyGroups, Importance, Allocation)  # all refer to the old channels
        store(model, report)
        return ir.passes.PassResult(model, modified=report.units_removed > 0)
