"""Analysis: what every allocator would do with the same groups, scores and budget, for the report.

Users choose an allocator once; the report shows them what the others would have done, so a surprising
width can be traced to the allocator and not to the model. For each allocator it records the kept
fraction per group at the requested sparsity and, over a grid of sparsities, the quality of the pruned
model on the calibration data: top-1 accuracy where the data has labels, top-1 agreement with the dense
model for other classifiers, output distortion otherwise. The DP is included only when a
`Sensitivity` is present (it is what the DP optimises; measuring it for a plot alone would double the
cost of a compile).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
from tqdm.auto import tqdm

from pcc.compiler.calibration import CalibrationData
from pcc.passes.allocation.allocation import AllocatorPass, RemovalPlanner, budget_cost
from pcc.passes.allocation.global_ranking import AllocateGlobal, AllocateLAMP
from pcc.passes.allocation.rate_distortion import AllocateDP
from pcc.passes.allocation.uniform import AllocateUniform
from pcc.passes.analysis.dependency_groups import DependencyGroups
from pcc.passes.analysis.importance import Importance
from pcc.passes.analysis.sensitivity import Sensitivity, output_distortion, resolve_metric
from pcc.passes.results import fetch, lookup, store

__all__ = ["AllocatorComparison", "CompareAllocators", "QUALITY_SPARSITIES"]

QUALITY_SPARSITIES = (0.1, 0.3, 0.5, 0.7, 0.9)


@dataclass
class AllocatorComparison:
    """Per allocator name: kept fraction per group (rows follow `groups`), achieved fraction, quality curve."""

    META_KEY = "pcc.allocator_comparison"
    PRODUCED_BY = "CompareAllocators"

    budget: str
    target: float
    groups: list[int]
    keep_fractions: dict[str, np.ndarray]
    achieved: dict[str, float]
    quality_name: str  # "top-1 accuracy", "top-1 agreement with dense" or the distortion metric
    sparsities: tuple[float, ...]
    quality: dict[str, list[float]]  # allocator -> quality at each of `sparsities`
    dense_quality: float
    predicted_distortion: dict[str, float] = field(default_factory=dict)  # summed single-group, if measured


@dataclass
class CompareAllocators(ir.passes.InPlacePass):
    """Runs each allocator's decision (not its pruning) on the current model and stores the comparison."""

    sparsity: float = 0.5
    budget: str = "params"
    calibration: CalibrationData | None = field(default=None, repr=False)
    sparsities: tuple[float, ...] = QUALITY_SPARSITIES
    recalibrate_bn: bool = False  # judge (and let the DP check) variants after BatchNorm recalibration
    workers: int | None = None  # for the DP's refinement sweeps, as for the compile's own DP
    ray_address: str | None = None
    progress: bool = field(default=False, repr=False)

    def requires(self, model: ir.Model) -> None:
        fetch(model, DependencyGroups)
        fetch(model, Importance)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        groups = fetch(model, DependencyGroups)
        planner = RemovalPlanner(groups, fetch(model, Importance).scores)
        cost = budget_cost(model, groups, self.budget)
        calibration = self.calibration or CalibrationData.random(model)
        sensitivity = lookup(model, Sensitivity)
        judge = _Judge(model, groups, calibration, self.recalibrate_bn)
        prunable = [g for g in groups.groups if g.prunable]
        comparison = AllocatorComparison(
            self.budget, self.sparsity, [g.index for g in prunable], {}, {}, judge.name, tuple(self.sparsities), {},
            judge.dense,
        )
        names = ["uniform", "global", "lamp"] + (["dp"] if sensitivity is not None else [])
        jobs = [(name, s) for name in names for s in (self.sparsity, *self.sparsities)]
        for name, sparsity in tqdm(jobs, desc="compare allocators", disable=not self.progress, leave=False):
            allocator = self._allocator(name, sparsity, calibration)
            allocation = allocator.allocate(model, planner, cost)
            if sparsity == self.sparsity and name not in comparison.achieved:
                comparison.keep_fractions[name] = np.asarray([allocation.keep_units[g.index] / g.num_units for g in prunable])
                comparison.achieved[name] = allocation.achieved
                if sensitivity is not None:
                    comparison.predicted_distortion[name] = sensitivity.summed_distortion(allocation.keep_units)
            else:
                comparison.quality.setdefault(name, []).append(judge(allocation.removed))
        store(model, comparison)
        return ir.passes.PassResult(model, modified=False)

    def _allocator(self, name: str, sparsity: float, calibration: CalibrationData) -> AllocatorPass:
        if name == "dp":
            return AllocateDP(
                sparsity, self.budget, calibration=calibration, recalibrate_bn=self.recalibrate_bn, workers=self.workers,
                ray_address=self.ray_address,
            )
        return {"uniform": AllocateUniform, "global": AllocateGlobal, "lamp": AllocateLAMP}[name](sparsity, self.budget)


class _Judge:
    """Scores a pruned variant on the calibration data, by the best measure the data allows."""

    def __init__(self, model: ir.Model, groups: DependencyGroups, calibration: CalibrationData, recalibrate: bool) -> None:
        from pcc.backends.onnx.runtime import session

        self.model, self.groups, self.recalibrate = model, groups, recalibrate
        self.batches = list(calibration.batches())
        self.reference = self._run(session(ir.serde.serialize_model(model).SerializeToString()))
        self.metric = resolve_metric("auto", self.reference)
        self.labels = None if calibration.labels is None else np.concatenate([labels for _, labels in self.batches])
        if self.labels is not None:
            self.name = "top-1 accuracy"
        elif self.metric == "kl":
            self.name = "top-1 agreement with dense"
        else:
            self.name = f"output distortion ({self.metric})"
        self.dense = self._quality(self.reference)

    def _run(self, sess) -> list[list[np.ndarray]]:
        return [sess.run(None, feeds) for feeds, _ in self.batches]

    def _quality(self, outputs: list[list[np.ndarray]]) -> float:
        if self.metric != "kl":
            return output_distortion(self.reference, outputs, self.metric)
        predicted = np.concatenate([np.argmax(batch[0], axis=1) for batch in outputs])
        expected = self.labels if self.labels is not None else np.concatenate([np.argmax(b[0], axis=1) for b in self.reference])
        return float(np.mean(predicted == expected))

    def __call__(self, removed: np.ndarray) -> float:
        from pcc.backends.onnx.runtime import session
        from pcc.passes.transforms.prune_channels import pruned_copy
        from pcc.passes.transforms.recalibrate_batchnorm import reestimate_batchnorm_statistics

        variant = pruned_copy(self.model, self.groups, removed)
        if self.recalibrate:
            reestimate_batchnorm_statistics(variant, [feeds for feeds, _ in self.batches])
        return self._quality(self._run(session(ir.serde.serialize_model(variant).SerializeToString())))
