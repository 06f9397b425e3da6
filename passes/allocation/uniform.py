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
    Where one step of a small, costly group is itself bigger than the tolerance (8 channels at full
    resolution under a MACs budget), the remaining gap is closed by stepping the groups whose steps
    are finest, so the budget is met rather than missed by a rounding step.
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
        if best_gap > _TOLERANCE:
            best = _close_gap(best, groups, fraction_of, self.sparsity)
        return self._result(planner, cost, best, reachable)


_TOLERANCE = 0.005  # fraction of the budget left to rounding before finer groups are stepped


def _close_gap(keep: np.ndarray, groups, fraction_of, target: float) -> np.ndarray:
    """Greedy single-group steps towards the target, each the one that narrows the gap most."""
    keep = keep.copy()
    gap = abs(fraction_of(keep) - target)
    for _ in range(4 * len(groups)):
        direction = -1 if fraction_of(keep) < target else 1  # fewer units removes more
        best_move, best_gap = None, gap
        for index, group in enumerate(groups):
            width = rounded_keep(group, keep[index] + direction * group.unit_multiple)
            if width == keep[index]:
                continue
            trial = keep.copy()
            trial[index] = width
            trial_gap = abs(fraction_of(trial) - target)
            if trial_gap < best_gap:
                best_move, best_gap = (index, width), trial_gap
        if best_move is None:
            break
        keep[best_move[0]], gap = best_move[1], best_gap
        if gap <= _TOLERANCE:
            break
    return keep


def _step_down(multiple: int, exact: float) -> float:
    return math.floor(exact / multiple) * multiple


def _step_up(multiple: int, exact: float) -> float:
    return math.ceil(exact / multiple) * multiple
