"""Uniform allocation: every group keeps the same fraction of its channels."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pcc.passes.allocation.allocation import Allocation, AllocatorPass, ParamCost, RemovalPlanner, rounded_keep, search_monotone

__all__ = ["AllocateUniform"]


@dataclass
class AllocateUniform(AllocatorPass):
    """One channel ratio for all groups, solved so that the removed parameters meet `sparsity`.

    The ratio is not the sparsity: removing half the channels of consecutive layers removes about
    three quarters of their weights, so the ratio is searched for on the exact parameter count.
    """

    def allocate(self, planner: RemovalPlanner, cost: ParamCost) -> Allocation:
        groups = planner.groups.groups

        def keep_at(ratio: float) -> np.ndarray:
            return np.asarray([rounded_keep(g, g.num_units * (1.0 - ratio)) for g in groups], dtype=np.int64)

        def fraction_at(ratio: float) -> float:
            return cost.removed_fraction(planner.mask(keep_at(ratio)))

        ratio = search_monotone(fraction_at, self.sparsity, 0.0, 1.0) if self.sparsity > 0 else 0.0
        return self._result(planner, cost, keep_at(ratio), reachable=fraction_at(1.0))
