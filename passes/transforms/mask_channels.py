"""MaskChannels: the dense twin of a pruned model, with the removed channels' consumer weights zeroed.

Every shape stays as it is; only the input-side weight slices (conv/linear input columns) of the units
an `Allocation` removes become zero, so those channels can no longer influence anything downstream.
Where no normalisation mixes channels, this model computes exactly what the physically pruned model
computes: `PruneChannels` is checked against it, and it is a cheap way to measure what a removal costs
without rewriting the graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from pcc.passes.allocation.allocation import Allocation
from pcc.passes.analysis.channel_rules import Role
from pcc.passes.analysis.dependency_groups import DependencyGroups
from pcc.passes.results import fetch

__all__ = ["MaskChannels", "mask_channels"]


def mask_channels(model: ir.Model, groups: DependencyGroups, removed: np.ndarray) -> int:
    """Zero consumer slices of removed units in place; returns the number of weights touched."""
    touched = 0
    initializers = model.graph.initializers
    for space_id, units in groups.space_units.items():
        space = groups.spaces[space_id]
        if not space.is_param or space.role is not Role.IN:
            continue
        gone = np.flatnonzero((units >= 0) & removed[np.maximum(units, 0)])
        if not len(gone):
            continue
        value = initializers[space.value]
        array = value.const_value.numpy().copy()
        index = [slice(None)] * array.ndim
        index[space.axis] = gone
        array[tuple(index)] = 0
        value.const_value = ir.tensor(array, name=value.name)
        touched += 1
    return touched


@dataclass
class MaskChannels(ir.passes.InPlacePass):
    """Transform: zero the consumer weights of the units in the stored `Allocation`."""

    def requires(self, model: ir.Model) -> None:
        fetch(model, DependencyGroups)
        fetch(model, Allocation)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        allocation = fetch(model, Allocation)
        touched = mask_channels(model, fetch(model, DependencyGroups), allocation.removed)
        return ir.passes.PassResult(model, modified=touched > 0)
