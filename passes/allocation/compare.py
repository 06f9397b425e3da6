"""Analysis: what every allocator would do with the same groups, scores and budget, for the report.

Users choose an allocator once; the report shows them what the others would have done, so a surprising
width can be traced to the allocator and not to the model. For each allocator it records the kept
fraction per group at the requested sparsity and, over a grid of sparsities, the quality of the pruned
model on the calibration data: top-1 accuracy where the data has labels, top-1 agreement with the dense
model for other classifiers, output distortion otherwise. The DP is included only when a
`Sensitivity` is present (it is what the DP optimises; measuring it for a plot alone would double the
cost of a compile). Every variant is measured through the sweep's meter (`VariantMeasurements`), so
allocations measured by the DP's guard, or equal across sparsities, run once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
from tqdm.auto import tqdm

from pcc.compiler.calibration import CalibrationData
from pcc.passes.allocation.allocation import Allocation, AllocatorPass, RemovalPlanner, budget_cost
from pcc.passes.allocation.global_ranking import AllocateGlobal, AllocateLAMP
from pcc.passes.allocation.rate_distortion import AllocateDP
from pcc.passes.allocation.uniform import AllocateUniform
from pcc.passes.analysis.dependency_groups import DependencyGroups
from pcc.passes.analysis.importance import Importance
from pcc.passes.analysis.sensitivity import Repair, Sensitivity, VariantMeter, VariantScore, shared_meter
from pcc.passes.results import fetch, lookup, store

__all__ = ["AllocatorComparison", "CompareAllocators", "QUALITY_SPARSITIES"]

QUALITY_SPARSITIES = (0.1, 0.3, 0.5, 0.7, 0.9)
_CLASSES: dict[str, type[AllocatorPass]] = {"uniform": AllocateUniform, "global": AllocateGlobal, "lamp": AllocateLAMP, "dp": AllocateDP}


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
    repair: Repair | None = None  # overrides recalibrate_bn: what every judged variant gets, as the final model
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
        repair = self.repair if self.repair is not None else Repair(recalibrate_bn=self.recalibrate_bn)
        meter = shared_meter(model, groups, calibration, repair)
        labels = None if calibration.labels is None else np.concatenate([labels for _, labels in calibration.batches()])
        judge = _Judge(meter, labels)
        prunable = [g for g in groups.groups if g.prunable]
        comparison = AllocatorComparison(
            self.budget, self.sparsity, [g.index for g in prunable], {}, {}, judge.name, tuple(self.sparsities), {},
            judge.dense,
        )
        names = ["uniform", "global", "lamp"] + (["dp"] if sensitivity is not None else [])
        jobs = [(name, s) for name in names for s in (self.sparsity, *self.sparsities)]
        compiled = lookup(model, Allocation)  # the compile's own answer, when it is one of these
        for name, sparsity in tqdm(jobs, desc="compare allocators", disable=not self.progress, leave=False):
            if compiled is not None and (compiled.method, compiled.target, compiled.budget) == (_CLASSES[name].__name__, sparsity, self.budget):
                allocation = compiled
            else:
                allocation = self._allocator(name, sparsity, calibration, repair).allocate(model, planner, cost)
            if sparsity == self.sparsity and name not in comparison.achieved:
                comparison.keep_fractions[name] = np.asarray([allocation.keep_units[g.index] / g.num_units for g in prunable])
                comparison.achieved[name] = allocation.achieved
                if sensitivity is not None:
                    comparison.predicted_distortion[name] = sensitivity.summed_distortion(allocation.keep_units)
            else:
                comparison.quality.setdefault(name, []).append(judge(allocation.removed))
        store(model, comparison)
        return ir.passes.PassResult(model, modified=False)

    def _allocator(self, name: str, sparsity: float, calibration: CalibrationData, repair: Repair) -> AllocatorPass:
        if name == "dp":  # on the sweep's curves, guarded (no refinement sweeps: a plot's point must cost little)
            return AllocateDP(sparsity, self.budget, calibration=calibration, repair=repair, refine_rounds=0)
        return _CLASSES[name](sparsity, self.budget)


class _Judge:
    """Scores a pruned variant on the calibration data, by the best measure the data allows.

    Variants are measured by the meter the sensitivity sweep left on the model (same data, same repair),
    so an allocation the DP's guard already measured is not run again.
    """

    def __init__(self, meter: VariantMeter, labels: np.ndarray | None) -> None:
        self.meter, self.labels = meter, labels
        self.reference_top1 = (
            np.concatenate([out[0].argmax(axis=1) for out in meter.reference]) if meter.metric == "kl" else None
        )
        if labels is not None and meter.metric == "kl":
            self.name = "top-1 accuracy"
        elif meter.metric == "kl":
            self.name = "top-1 agreement with dense"
        else:
            self.name = f"output distortion ({meter.metric})"
        self.dense = self._quality(VariantScore(0.0, self.reference_top1))

    def _quality(self, score: VariantScore) -> float:
        if score.predicted is None:
            return score.distortion
        expected = self.labels if self.labels is not None else self.reference_top1
        return float(np.mean(score.predicted == expected))

    def __call__(self, removed: np.ndarray) -> float:
        return self._quality(self.meter.joint(removed))
