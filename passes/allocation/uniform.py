"""Uniform allocation: every group keeps the same fraction of its channels."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from pcc.passes.allocation.allocation import (
    Allocation,
    AllocatorPass,
    RemovalPlanner,
    rounded_keep,
    search_monotone,
)
from pcc.passes.allocation.budget import Cost

__all__ = ["AllocateUniform"]


@dataclass
class AllocateUniform(AllocatorPass):
    """One channel ratio for all groups, solved so that the removed parameters meet `sparsity`.

    The ratio is not the sparsity: removing half the channels of consecutive layers removes about three
    quarters of their weights, so the ratio is searched for on the exact parameter count. Integer
    channel counts then make the removed fraction jump in steps (all groups of 8 channels move
    together), so each group finally keeps the floor or the ceiling of its exact share, whichever
    brings the total closest to the target: every group stays within one rounding step of the ratio.
    """

    def allocate(self, model: ir.Model, planner: RemovalPlanner, cost: Cost) -> Allocation:
        groups = planner.groups.groups
        sizes = np.asarray([g.num_units for g in groups], dtype=np.float64)

        def keep_at(ratio: float) -> np.ndarray:
            return np.asarray([rounded_keep(g, n * (1.0 - ratio)) for g, n in zip(groups, sizes)], dtype=np.int64)

        def fraction_of(keep: np.ndarray) -> float:
            return cost.removed_fraction(planner.mask(keep))

        reachable = fraction_of(keep_at(1.0))
        if self.sparsity == 0:
            return self._result(planner, cost, keep_at(0.0), reachable)
        ratio = search_monotone(lambda r: fraction_of(keep_at(r)), self.sparsity, 0.0, 1.0)

        exact = sizes * (1.0 - ratio)
        lower = np.asarray([rounded_keep(g, _step_down(g.unit_multiple, e)) for g, e in zip(groups, exact)])
        upper = np.asarray([rounded_keep(g, _step_up(g.unit_multiple, e)) for g, e in zip(groups, exact)])
        # flip groups from their ceiling to their floor, the ones whose exact share is lowest first
        order = np.argsort(exact / np.asarray([g.unit_multiple for g in groups]) % 1.0, kind="stable")
        keep, best, best_gap = upper.copy(), upper.copy(), abs(fraction_of(upper) - self.sparsity)
        for index in order:
            if lower[index] == upper[index]:
                continue
            keep[index] = lower[index]
            gap = abs(fraction_of(keep) - self.sparsity)
            if gap < best_gap:
                best, best_gap = keep.copy(), gap
        return self._result(planner, cost, best, reachable)


def _step_down(multiple: int, exact: float) -> float:
    return math.floor(exact / multiple) * multiple


def _step_up(multiple: int, exact: float) -> float:
    return math.ceil(exact / multiple) * multiple
