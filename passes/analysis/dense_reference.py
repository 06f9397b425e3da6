"""KeepDenseReference, RecordKeptChannels: remember the model before pruning, and where its channels went.

Repairs that re-fit a pruned model (`Reconstruct`) need what the model computed *before* units, blocks
or weights were removed: the dense model's activations are their targets. `KeepDenseReference` stores a
clone of the model as it is when it runs (weights are shared with the model, not copied: pcc's transforms
replace tensors rather than edit them, so the clone keeps the dense values for free).

Channel pruning keeps node and weight names but shrinks tensors, so a pruned layer's output channel k is
dense channel `kept[k]`. `RecordKeptChannels`, run just before `PruneChannels`, notes those indices from the
pending allocation; without a kept reference it does nothing, so it can sit in every pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from pcc.passes.allocation.allocation import Allocation
from pcc.passes.analysis.dependency_groups import DependencyGroups
from pcc.passes.results import fetch, lookup, store

__all__ = ["DenseReference", "KeepDenseReference", "RecordKeptChannels"]


@dataclass
class DenseReference:
    """The model before the transforms that followed `KeepDenseReference`, and the channels they kept."""

    META_KEY = "pcc.dense_reference"
    PRODUCED_BY = "KeepDenseReference"

    model: ir.Model = field(repr=False)
    # (tensor name, axis) -> the dense indices that the pruned tensor's elements along that axis are
    kept: dict[tuple[str, int], np.ndarray] = field(default_factory=dict, repr=False)

    def kept_along(self, name: str, axis: int, size: int) -> np.ndarray:
        """Dense indices of the `size` elements a tensor now has along `axis` (all of them if none went)."""
        return self.kept.get((name, axis), np.arange(size))

    def record(self, kept: dict[tuple[str, int], np.ndarray]) -> None:
        """Add one pruning's kept indices (relative to the tensors as they were), composing with earlier ones."""
        for key, indices in kept.items():
            earlier = self.kept.get(key)
            self.kept[key] = indices if earlier is None else earlier[indices]

    def summary(self) -> str:
        nodes = sum(1 for _ in self.model.graph)
        return f"dense reference of {nodes} nodes; {len(self.kept)} tensor axes pruned since"


@dataclass
class KeepDenseReference(ir.passes.InPlacePass):
    """Analysis: store a clone of the model as it is now (`DenseReference`), for repairs after pruning."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        store(model, DenseReference(model.clone()))
        return ir.passes.PassResult(model, modified=False)


@dataclass
class RecordKeptChannels(ir.passes.InPlacePass):
    """Analysis: note in the kept `DenseReference` which channels the pending `Allocation` keeps.

    Run right before `PruneChannels` (which drops the groups and the allocation it used). Nothing to do
    when no reference is kept.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        reference = lookup(model, DenseReference)
        if reference is not None:
            groups = fetch(model, DependencyGroups)
            reference.record(groups.kept_indices(fetch(model, Allocation).removed))
        return ir.passes.PassResult(model, modified=False)
