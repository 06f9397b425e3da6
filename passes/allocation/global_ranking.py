"""Global allocation: one ranking of all units across the network (plain, or with LAMP scores)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from pcc.passes.allocation.allocation import Allocation, AllocatorPass, RemovalPlanner, rounded_keep, search_monotone
from pcc.passes.allocation.budget import Cost
from pcc.passes.analysis.dependency_groups import DependencyGroups
from pcc.passes.analysis.importance import lamp_scores

__all__ = ["AllocateGlobal", "AllocateLAMP"]


@dataclass
class AllocateGlobal(AllocatorPass):
    """Remove the globally lowest-ranked units until the budget is met.

    Raw magnitudes are not comparable across layers (fan-in differs), so each score is divided by its
    group's mean first; groups whose units stand out less from each other lose more.
    """

    def comparable_scores(self, groups: DependencyGroups, scores: np.ndarray) -> np.ndarray:
        normalised = scores.astype(np.float64).copy()
        for group in groups.groups:
            mean = normalised[group.units].mean() if group.num_units else 0.0
            normalised[group.units] = normalised[group.units] / mean if mean > 0 else 1.0
        return normalised

    def allocate(self, model: ir.Model, planner: RemovalPlanner, cost: Cost) -> Allocation:
        groups = planner.groups.groups
        order = np.argsort(self.comparable_scores(planner.groups, planner.scores), kind="stable")
        sizes = np.asarray([g.num_units for g in groups], dtype=np.int64)

        def keep_at(position: float) -> np.ndarray:
            lowest = order[: int(round(position))]
            dropped = np.bincount(planner.group_of_unit[lowest], minlength=len(groups))
            return np.asarray([rounded_keep(g, n - d) for g, n, d in zip(groups, sizes, dropped)], dtype=np.int64)

        def fraction_at(position: float) -> float:
            return cost.removed_fraction(planner.mask(keep_at(position)))

        count = float(len(order))
        position = search_monotone(fraction_at, self.sparsity, 0.0, count) if self.sparsity > 0 else 0.0
        return self._result(planner, cost, keep_at(position), reachable=fraction_at(count))


@dataclass
class AllocateLAMP(AllocateGlobal):
    """Layer-adaptive magnitude pruning (Lee et al., 2021), applied to whole units.

    A unit's score becomes its importance divided by the summed importance of the units in its group that
    score at least as high. With squared magnitudes (`--importance l2`) this is the LAMP score, which
    bounds the output distortion a layer's pruning causes; one global threshold on it then sets every
    group's width. The group's strongest unit always scores 1, so no group is emptied by the ranking.
    """

    def comparable_scores(self, groups: DependencyGroups, scores: np.ndarray) -> np.ndarray:
        return lamp_scores(groups, scores)
