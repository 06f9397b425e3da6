"""What every allocator shares: the `Allocation` result, an exact parameter-cost model, and the rules
that turn "keep k units of this group" into a removal mask that is always valid.

`--sparsity S` is a fraction of the *prunable parameters* (weights with at least one prunable axis) to
remove. Removing a channel shrinks a convolution on both sides, so parameters fall faster than channels;
allocators therefore search for the channel ratio (or global threshold) whose exact parameter count
meets S, and report what was achieved, or the most that is reachable.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from pcc.compiler.errors import InvalidRequestError
from pcc.compiler.options import check_sparsity
from pcc.passes.allocation.budget import BUDGETS, Cost, mac_cost, param_cost
from pcc.passes.analysis.dependency_groups import DependencyGroup, DependencyGroups
from pcc.passes.analysis.importance import Importance
from pcc.passes.analysis.quantization import quantized_model_hint
from pcc.passes.results import fetch, store

__all__ = [
    "Allocation",
    "AllocatorPass",
    "budget_cost",
    "check_sparsity",
    "RemovalPlanner",
    "rounded_keep",
    "search_monotone",
]


@dataclass
class Allocation:
    """Which units go: the decision `PruneChannels` carries out."""

    META_KEY = "pcc.allocation"
    PRODUCED_BY = "an allocator pass (AllocateUniform, AllocateGlobal, AllocateLAMP, AllocateDP)"

    method: str
    budget: str  # what the target counts: params, macs or latency
    target: float  # requested fraction of that cost to remove
    removed: np.ndarray  # bool per unit
    keep_units: np.ndarray  # kept units per group
    cost_before: float
    cost_after: float  # as the budget's cost model predicts it
    reachable: float  # the largest fraction this allocator can remove
    # the additivity check of distortion-driven allocators: summed single-group vs joint distortion
    predicted_distortion: float | None = None
    measured_distortion: float | None = None
    # the DP's guard: measured joint distortion of each candidate ("dp", "uniform", ...), and the one kept
    candidates: dict[str, float] = field(default_factory=dict)
    kept_from: str | None = None  # None: the allocator's own answer
    refinement: str | None = None  # the DP's refinement rounds, where they were asked for and skipped

    @property
    def achieved(self) -> float:
        return 1.0 - self.cost_after / self.cost_before if self.cost_before else 0.0

    def summary(self) -> str:
        line = (
            f"{self.method}: removes {100 * self.achieved:.1f}% of {_BUDGET_TEXT[self.budget]} "
            f"(target {100 * self.target:.1f}%)"
        )
        if self.target > self.reachable + 1e-9:
            line += f"; best reachable is {100 * self.reachable:.1f}%"
        own = self.candidates.get("dp", self.measured_distortion)
        if self.predicted_distortion is not None and own is not None:
            line += (
                f"\nadditivity check: sum of single-group distortions {self.predicted_distortion:.4g}, "
                f"measured with all groups pruned {own:.4g}"
            )
        return "\n".join([line, *self.dp_notes()])

    def dp_notes(self) -> list[str]:
        """What the DP decided beyond its answer: its guard's verdict, skipped refinement (each if any)."""
        return [text for text in (self.guard_line(), self.refinement) if text]

    def guard_line(self) -> str | None:
        """What the DP's guard decided, when it measured the simple allocators too (else None)."""
        own = self.candidates.get("dp")
        if own is None or len(self.candidates) < 2:
            return None
        if self.kept_from is not None:
            return f"dp: kept {self.kept_from}'s allocation (joint distortion {self.measured_distortion:.4g} vs {own:.4g})"
        others = ", ".join(f"{name} {value:.4g}" for name, value in self.candidates.items() if name != "dp")
        return f"dp: its own allocation measured best (joint distortion {own:.4g}; {others})"


_BUDGET_TEXT = {"params": "prunable params", "macs": "MACs", "latency": "latency (predicted)"}


def _valid(units: np.ndarray) -> np.ndarray:
    return units[units >= 0]


def rounded_keep(group: DependencyGroup, keep: float) -> int:
    """Kept units: all of them, or a multiple of the group's unit multiple, whichever is nearer `keep`.

    A group whose size is not a multiple (18 channels, round_to 8) may stay whole; it is never rounded
    below its size unless something is actually being pruned.
    """
    if keep >= group.num_units:
        return group.num_units
    multiple = group.unit_multiple
    rounded = max(int(math.floor(keep / multiple + 0.5)) * multiple, group.min_units)
    if rounded >= group.num_units or group.num_units - keep < abs(keep - rounded):
        return group.num_units
    return rounded


class RemovalPlanner:
    """Turns kept-unit counts per group into a valid removal mask, fast enough to search over.

    Within each group the lowest-scoring units go first. An axis can hold only some of a group's units
    (one output of a Split, say); if all of them would go, the axis would have zero width, so its
    best-scoring unit is put back.
    """

    def __init__(self, groups: DependencyGroups, scores: np.ndarray) -> None:
        self.groups = groups
        self.scores = scores
        self.group_of_unit = groups.unit_group()
        self.rank_in_group = np.empty(groups.num_units, dtype=np.int64)
        for group in groups.groups:
            order = np.argsort(scores[group.units], kind="stable")
            self.rank_in_group[group.unit_start + order] = np.arange(group.num_units)
        self._sizes = np.asarray([g.num_units for g in groups.groups], dtype=np.int64)
        # axes made only of units: the ones that could become empty
        self._exposed = [units for units in groups.space_units.values() if not (units < 0).any()]
        self._exposed_flat = np.concatenate(self._exposed) if self._exposed else np.empty(0, np.int64)
        self._exposed_starts = np.cumsum([0] + [len(u) for u in self._exposed])[:-1]

    def mask(self, keep: np.ndarray) -> np.ndarray:
        drop = self._sizes - np.asarray(keep, dtype=np.int64)
        removed = self.rank_in_group < drop[self.group_of_unit]
        if self._exposed:
            emptied = np.logical_and.reduceat(removed[self._exposed_flat], self._exposed_starts)
            for index in np.flatnonzero(emptied):
                candidates = np.unique(self._exposed[index])
                removed[candidates[np.argmax(self.scores[candidates])]] = False
        return removed


def search_monotone(fraction_at: Callable[[float], float], target: float, lo: float, hi: float, steps: int = 40) -> float:
    """The x in [lo, hi] whose non-decreasing step function value is closest to `target`."""
    best_x, best_gap = lo, abs(fraction_at(lo) - target)
    for _ in range(steps):
        mid = (lo + hi) / 2
        value = fraction_at(mid)
        if abs(value - target) < best_gap:
            best_x, best_gap = mid, abs(value - target)
        if value < target:
            lo = mid
        else:
            hi = mid
    value = fraction_at(hi)
    if abs(value - target) < best_gap:
        best_x = hi
    return best_x


@dataclass
class AllocatorPass(ir.passes.InPlacePass):
    """Base of allocation passes: reads groups and importance, stores an `Allocation`.

    `budget` names the cost `sparsity` is a fraction of: `params` (prunable weights), `macs`, or
    `latency` (needs a `LatencyTable` from `MeasureLatency`).
    """

    sparsity: float = 0.5
    budget: str = "params"

    def requires(self, model: ir.Model) -> None:
        check_sparsity(self.sparsity)
        if self.budget not in BUDGETS:
            raise InvalidRequestError(f"unknown budget {self.budget!r}; choose from {', '.join(BUDGETS)}")
        fetch(model, DependencyGroups)
        fetch(model, Importance)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        groups = fetch(model, DependencyGroups)
        importance = fetch(model, Importance)
        if self.sparsity > 0 and not any(g.prunable for g in groups.groups):
            selected = sorted({g.kind for g in groups.groups if g.enabled})
            others = sorted({g.kind for g in groups.groups if not g.enabled and g.num_units > g.unit_multiple})
            hint = f" (it has prunable {', '.join(others)}: see --prune)" if others else ""
            what = f"no {'/'.join(selected)} group of this model can lose units" if selected else "the model has no channel groups"
            raise InvalidRequestError(f"nothing to prune: {what}{hint}{quantized_model_hint(model)}")
        cost = budget_cost(model, groups, self.budget)
        store(model, self.allocate(model, RemovalPlanner(groups, importance.scores), cost))
        return ir.passes.PassResult(model, modified=False)

    @abc.abstractmethod
    def allocate(self, model: ir.Model, planner: RemovalPlanner, cost: Cost) -> Allocation: ...

    def _result(self, planner: RemovalPlanner, cost: Cost, keep: np.ndarray, reachable: float) -> Allocation:
        groups = planner.groups
        removed = planner.mask(keep)
        kept = np.asarray([g.num_units - removed[g.units].sum() for g in groups.groups], dtype=np.int64)
        return Allocation(
            method=type(self).__name__,
            budget=self.budget,
            target=self.sparsity,
            removed=removed,
            keep_units=kept,
            cost_before=cost.total,
            cost_after=cost.remaining(removed),
            reachable=reachable,
        )


def budget_cost(model: ir.Model, groups: DependencyGroups, budget: str) -> Cost:
    if budget == "params":
        return param_cost(model, groups)
    if budget == "macs":
        return mac_cost(model, groups)
    from pcc.passes.analysis.latency import LatencyTable

    return fetch(model, LatencyTable).cost(groups)
