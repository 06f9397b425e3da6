"""Rate-distortion allocation: the best split of a global budget across groups, by dynamic programming.

Following "Efficient Joint Optimization of Layer-Adaptive Weight Pruning in Deep Neural Networks"
(Xu et al., ICCV 2023): if the output distortion of pruning several groups is close to the sum of the
distortions of pruning each alone, then choosing one kept width per group to minimise total distortion
subject to removing at least a given cost is a multiple-choice knapsack, solved exactly by a dynamic
program over groups x discretised cost.

Each group's options are its valid widths (multiples of its unit multiple), with the distortion
interpolated from the measured sensitivity curve and the cost saved when that group alone is narrowed.
For the latency budget those savings add up by construction; for parameters and MACs they do not quite
(narrowing both sides of a weight saves less than the two savings summed), so the required saving is
searched for until the exact cost of the DP's answer meets the target. The result records the sum of
the single-group distortions the DP predicted and the distortion measured with every group pruned at
once: the additivity check.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from pcc.compiler.calibration import CalibrationData
from pcc.passes.allocation.allocation import Allocation, AllocatorPass, RemovalPlanner, rounded_keep
from pcc.passes.allocation.budget import Cost
from pcc.passes.analysis.sensitivity import Repair, Sampling, Sensitivity, VariantMeter, measure_sensitivity, shared_meter
from pcc.passes.results import fetch

__all__ = ["AllocateDP", "solve_rate_distortion"]

_COST_BINS = 2000  # resolution of the discretised budget
_MAX_OPTIONS = 64  # widths considered per group (evenly spread when a group has more)
_BAND = 0.02  # the DP's summed saving may exceed what it is asked for by this fraction of the cost, no more
_GUARD_SLACK = 0.01  # a simple allocator's answer competes if it removes at least the DP's fraction less this


def solve_rate_distortion(
    distortion: np.ndarray, saving: np.ndarray, required: int, limit: int | None = None
) -> tuple[np.ndarray, float]:
    """Exact minimum of sum(distortion[g, choice[g]]) subject to required <= sum(saving[g, choice[g]]) <= limit.

    `distortion` and `saving` are [groups, options] arrays (use +inf distortion for padding); savings are
    non-negative integers; no `limit` means no upper bound. The upper bound matters when measured
    distortion is not monotone (pruning a group further can measure *lower*): without it the optimum may
    remove far more than the budget asks. Returns the chosen option per group and the total distortion,
    which is +inf when no choice lands in the range. Runs in O(groups x options x limit).
    """
    distortion = np.asarray(distortion, dtype=np.float64)
    saving = np.asarray(saving, dtype=np.int64)
    if (saving < 0).any():
        raise ValueError("savings must be non-negative")
    required = max(int(required), 0)
    capped = limit is None  # without an upper bound, every saving >= required is one state
    top = required if capped else max(int(limit), required)
    groups, options = distortion.shape
    # best[b]: least distortion with the saving so far = b (with no limit, >= b at the cap b = required)
    best = np.full(top + 1, np.inf)
    best[0] = 0.0
    chosen = np.zeros((groups, top + 1), dtype=np.int64)  # option taken to reach a state
    source = np.zeros((groups, top + 1), dtype=np.int64)  # the state it was taken from
    states = np.arange(top + 1)
    for g in range(groups):
        new = np.full(top + 1, np.inf)
        for option in range(options):
            shift = int(saving[g, option])
            if not np.isfinite(distortion[g, option]) or (shift > top and not capped):
                continue
            candidate = best + distortion[g, option]
            # states b <= top - shift move to b + shift, one each (capped: all but the last land below the cap)
            moved = top - shift + (0 if capped else 1)
            if moved > 0:
                better = candidate[:moved] < new[shift : shift + moved]
                targets = states[shift : shift + moved][better]
                new[targets] = candidate[:moved][better]
                chosen[g, targets] = option
                source[g, targets] = states[:moved][better]
            if capped:  # every state from top - shift on reaches the cap: the best of them competes for it
                first = max(moved, 0)
                start = first + int(np.argmin(candidate[first:]))
                if candidate[start] < new[top]:
                    new[top], chosen[g, top], source[g, top] = candidate[start], option, start
        best = new
    state = required + int(np.argmin(best[required:]))
    if not np.isfinite(best[state]):
        return np.zeros(groups, dtype=np.int64), float("inf")
    total = float(best[state])
    picks = np.zeros(groups, dtype=np.int64)
    for g in range(groups - 1, -1, -1):
        picks[g] = chosen[g, state]
        state = source[g, state]
    return picks, total


@dataclass
class AllocateDP(AllocatorPass):
    """Minimise the summed per-group output distortion under the budget (needs `Sensitivity`).

    Distortions are not quite additive, least of all at high sparsity, where pruned groups feed each
    other worse inputs. With `refine_rounds`, after the first answer up to that many rounds re-measure
    every group's curve around the current answer (all other groups at their allocated widths), solve the
    DP again on these conditional curves, and the answer with the lowest measured joint distortion is
    kept; the rounds stop at the first that does not lower it. Off by default: each costs a sweep, and
    their curves are measured with `repair`, so where the final model gets more (`guard_repair`:
    reconstruction) they optimise the wrong thing (on ResConcat with `ls` they made the DP's own
    candidate worse at 0.3/0.5/0.7). `compile_pipeline` turns them on where the two repairs agree. A round
    re-measures as many variants as the sweep did, so above `refine_variant_limit` of them the rounds are
    skipped (ResNet-50's 296 variants take about 9 minutes a round on 2 cores) and the result says so.

    With `guard` (the default), the simple allocators' answers at the same budget (uniform, global,
    LAMP: one whole-model run each) are candidates too, and the lowest measured joint distortion wins:
    the DP never returns an allocation that measures worse than theirs. The result says which one was
    kept (`Allocation.kept_from`) and every candidate's distortion (`Allocation.candidates`).

    `calibration` is what the joint distortion and the refinement sweeps run on; give it the data the
    sensitivity was measured on, and the same `repair` (or `recalibrate_bn`).
    """

    calibration: CalibrationData | None = field(default=None, repr=False)
    recalibrate_bn: bool = False  # as the sensitivity was measured
    refine_rounds: int = 0
    refine_variant_limit: int = 128
    workers: int | None = None  # for the conditional sweeps of the refinement rounds
    ray_address: str | None = None
    repair: Repair | None = None  # overrides recalibrate_bn
    guard: bool = True  # also measure the simple allocators' answers and keep the best
    # what the guard's whole-model comparisons get: the final model's repair (reconstruction), when the
    # sweep's variants get a cheaper one; each candidate is one whole-model run, so exactness is affordable
    guard_repair: Repair | None = None
    sampling: Sampling = Sampling()  # for the refinement sweeps

    def requires(self, model: ir.Model) -> None:
        super().requires(model)
        fetch(model, Sensitivity)

    def allocate(self, model: ir.Model, planner: RemovalPlanner, cost: Cost) -> Allocation:
        sensitivity = fetch(model, Sensitivity)
        calibration = self.calibration or CalibrationData.random(model)
        repair = self.repair if self.repair is not None else Repair(recalibrate_bn=self.recalibrate_bn)
        meter = shared_meter(model, planner.groups, calibration, repair, sensitivity.metric)

        def joint(keep: np.ndarray) -> float:
            return meter.joint(planner.mask(keep)).distortion

        keep, reachable = self._solve(planner, cost, sensitivity)
        best, best_joint = keep, joint(keep)
        rounds = self.refine_rounds if self.sparsity > 0 else 0
        skipped = rounds > 0 and sensitivity.variants > self.refine_variant_limit
        for _ in range(0 if skipped else rounds):
            conditional = measure_sensitivity(
                model, planner.groups, planner.scores, calibration, tuple(sensitivity.keep_fractions[:-1]),
                sensitivity.metric, self.workers, self.ray_address, repair=repair, around=keep, sampling=self.sampling,
                reference=meter.reference,
            )
            refined, _ = self._solve(planner, cost, conditional)
            if np.array_equal(refined, keep):
                break
            keep, measured = refined, joint(refined)
            if measured >= best_joint:
                break  # the conditional curves no longer lead anywhere better
            best, best_joint = refined, measured
        allocation = self._result(planner, cost, best, reachable)
        allocation.predicted_distortion = sensitivity.summed_distortion(allocation.keep_units)
        allocation.measured_distortion = best_joint
        allocation.candidates = {"dp": best_joint}
        if skipped:
            allocation.refinement = f"refinement skipped: a round would re-measure {sensitivity.variants} variants (limit {self.refine_variant_limit})"
        if self.guard and self.sparsity > 0:
            if self.guard_repair is not None and self.guard_repair != repair:
                # not stored on the model: the sweep's meter stays the one later passes share
                meter = VariantMeter.dense(
                    model, planner.groups, calibration, sensitivity.metric, self.guard_repair, sampling=self.sampling
                )
                allocation.measured_distortion = meter.joint(allocation.removed).distortion
                allocation.candidates = {"dp": allocation.measured_distortion}
            allocation = self._guarded(model, planner, cost, allocation, meter)
        return allocation

    def _guarded(self, model: ir.Model, planner: RemovalPlanner, cost: Cost, dp: Allocation, meter) -> Allocation:
        """The DP's allocation, or a simple allocator's if that one measures less joint distortion at a
        budget at least as tight (each simple allocator is one whole-model run, remembered by the meter)."""
        from pcc.passes.allocation.global_ranking import AllocateGlobal, AllocateLAMP
        from pcc.passes.allocation.uniform import AllocateUniform

        winner = dp
        for name, allocator in (("uniform", AllocateUniform), ("global", AllocateGlobal), ("lamp", AllocateLAMP)):
            other = allocator(self.sparsity, self.budget).allocate(model, planner, cost)
            dp.candidates[name] = meter.joint(other.removed).distortion
            tighter = other.achieved >= min(dp.achieved, self.sparsity) - _GUARD_SLACK
            if tighter and dp.candidates[name] < (winner.measured_distortion or np.inf):
                winner = dataclasses.replace(other, measured_distortion=dp.candidates[name], kept_from=name)
        if winner is dp:
            return dp
        winner.method = dp.method
        winner.predicted_distortion = dp.predicted_distortion
        winner.candidates = dp.candidates
        return winner

    def _solve(self, planner: RemovalPlanner, cost: Cost, curves: Sensitivity) -> tuple[np.ndarray, float]:
        """The DP's widths on these curves (the narrowest allowed if the target is out of reach), and the
        largest fraction of the cost they can remove."""
        full = np.asarray([g.num_units for g in planner.groups.groups], dtype=np.int64)
        widths, distortion, saving = _options(planner, cost, curves, full)

        def keep_for(required: float) -> np.ndarray | None:
            step = cost.total / _COST_BINS
            lowest = int(np.ceil(required / step))
            picks, total = solve_rate_distortion(
                distortion, np.floor(saving / step).astype(np.int64), lowest, lowest + int(_BAND * _COST_BINS)
            )
            if not np.isfinite(total):
                return None
            keep = full.copy()
            for row, group in enumerate(curves.groups):
                keep[group] = widths[row, picks[row]]
            return keep

        narrowest = full.copy()
        for row, group in enumerate(curves.groups):
            narrowest[group] = widths[row, 0]
        reachable = cost.removed_fraction(planner.mask(narrowest))
        keep = full if self.sparsity == 0 else self._search(planner, cost, keep_for, saving)
        return (narrowest if keep is None else keep), reachable

    def _search(self, planner: RemovalPlanner, cost: Cost, keep_for, saving: np.ndarray) -> np.ndarray | None:
        """The required (summed single-group) saving whose DP answer's exact cost is closest to the target."""
        target = self.sparsity * cost.total
        lo, hi = 0.0, float(saving.max(axis=1).sum())
        best, best_gap = None, np.inf
        for _ in range(30):
            required = (lo + hi) / 2
            keep = keep_for(required)
            if keep is None:
                hi = required
                continue
            removed = cost.total - cost.remaining(planner.mask(keep))
            gap = abs(removed - target)
            if gap < best_gap:
                best, best_gap = keep, gap
            if removed < target:
                lo = required
            else:
                hi = required
            if gap <= 1e-4 * cost.total:
                break
        return best


def _options(planner: RemovalPlanner, cost: Cost, sensitivity: Sensitivity, full: np.ndarray):
    """Per measured group: candidate widths (ascending, ending at full), interpolated distortion, saving."""
    rows = len(sensitivity.groups)
    widths = np.zeros((rows, _MAX_OPTIONS + 1), dtype=np.int64)
    distortion = np.full(widths.shape, np.inf)
    saving = np.zeros(widths.shape)
    for row, index in enumerate(sensitivity.groups):
        group = planner.groups.groups[index]
        curve_units, curve = sensitivity.keep_units[row], sensitivity.distortion[row]
        # no extrapolation below the narrowest measured width
        lowest = max(group.min_units, int(curve_units[0]))
        valid = sorted({rounded_keep(group, k) for k in range(lowest, group.num_units + 1)})
        if len(valid) > _MAX_OPTIONS:
            picks = np.unique(np.round(np.linspace(0, len(valid) - 1, _MAX_OPTIONS)).astype(int))
            valid = [valid[i] for i in picks]
        for column, width in enumerate(valid):
            keep = full.copy()
            keep[index] = width
            widths[row, column] = width
            distortion[row, column] = float(np.interp(width, curve_units, curve))
            saving[row, column] = cost.total - cost.remaining(planner.mask(keep))
        widths[row, len(valid) :] = group.num_units  # padding: never chosen (infinite distortion)
    return widths, distortion, np.maximum(saving, 0.0)

