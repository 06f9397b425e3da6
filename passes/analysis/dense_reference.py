"""KeepDenseReference, RecordKeptChannels: remember the model before pruning, and where its channels went.

Repairs that re-fit a pruned model (`Reconstruct`) need what the model computed *before* units, blocks
or weights were removed: the dense model's activations are their targets. `KeepDenseReference` stores a
clone of the model as it is when it runs (weights are shared with the model, not copied: pcc's transforms
replace tensors rather than edit them, so the clone keeps the dense values for free).

Channel pruning keeps node and weight names but shrinks tensors, so a pruned layer's output channel k is
dense channel `kept[k]`. `RecordKeptChannels`, run just before `PruneChannels`, notes those indices from the
pending allocation, in every stored result that tracks them (this reference, a QDQ model's folded quantization);
with none stored it does nothing, so it can sit in every pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from pcc.passes.allocation.allocation import Allocation
from pcc.passes.analysis.dependency_groups import DependencyGroups
from pcc.passes.results import TracksKeptChannels, fetch, store

__all__ = ["DenseReference", "KeepDenseReference", "RecordKeptChannels"]


@dataclass
class DenseReference(TracksKeptChannels):
    """The model before the transforms that followed `KeepDenseReference`, and the channels they kept."""

    META_KEY = "pcc.dense_reference"
    PRODUCED_BY = "KeepDenseReference"

    model: ir.Model = field(repr=False)
    kept: dict[tuple[str, int], np.ndarray] = field(default_factory=dict, repr=False)

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
    """Analysis: note in every stored result that tracks kept channels (the kept `DenseReference`, folded
    quantization) which channels the pending `Allocation` keeps.

    Run right before `PruneChannels` (which drops the groups and the allocation it used). Nothing to do
    when no such result is stored.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        trackers = [result for result in model.meta.values() if isinstance(result, TracksKeptChannels)]
        if trackers:
            kept = fetch(model, DependencyGroups).kept_indices(fetch(model, Allocation).removed)
            for tracker in trackers:
                tracker.record(kept)
        return ir.passes.PassResult(model, modified=False)
