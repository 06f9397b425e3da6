"""Importance: one score per unit, computed over every weight slice of the unit's whole group.

A unit's channels appear in several layers (the producer's output rows, the consumers' input columns,
norm scales). Magnitude criteria sum |w|^p over the unit's slice in each of those weights, then reduce
across weights (mean, sum or max), as DepGraph's group importance does. `bn` scores by the
normalisation scale |gamma|; models exported in eval mode usually have BatchNorm folded into the
convolution, so groups without a norm scale fall back to L2 and are listed in `fallback_groups`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from pcc.passes.analysis.channel_rules import Role
from pcc.passes.analysis.dependency_groups import DependencyGroups
from pcc.passes.results import fetch, store

__all__ = ["CRITERIA", "REDUCTIONS", "Importance", "ScoreImportance", "score_units"]

CRITERIA = ("l1", "l2", "bn", "random")
REDUCTIONS = ("mean", "sum", "max")
_MAGNITUDE_ROLES = {Role.OUT, Role.IN, Role.SCALE, Role.NORM_SCALE}


@dataclass
class Importance:
    """Scores of every unit (global unit ids of `DependencyGroups`); higher means keep."""

    META_KEY = "pcc.importance"
    PRODUCED_BY = "ScoreImportance"

    criterion: str
    reduction: str
    scores: np.ndarray
    fallback_groups: list[int] = field(default_factory=list)

    def of_group(self, groups: DependencyGroups, index: int) -> np.ndarray:
        return self.scores[groups.groups[index].units]


def score_units(
    model: ir.Model, groups: DependencyGroups, criterion: str = "l2", reduction: str = "mean", seed: int = 0
) -> Importance:
    if criterion not in CRITERIA:
        raise ValueError(f"unknown importance criterion {criterion!r}; choose from {', '.join(CRITERIA)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; choose from {', '.join(REDUCTIONS)}")
    if criterion == "random":
        return Importance(criterion, reduction, np.random.default_rng(seed).random(groups.num_units))
    weights = {name: value.const_value for name, value in model.graph.initializers.items()}
    if criterion == "bn":
        scores, covered = _reduce_over_spaces(groups, weights, {Role.NORM_SCALE}, power=1, reduction=reduction)
        missing = [g.index for g in groups.groups if not covered[g.units].all()]
        if missing:
            l2, _ = _reduce_over_spaces(groups, weights, _MAGNITUDE_ROLES, power=2, reduction=reduction)
            for index in missing:
                scores[groups.groups[index].units] = l2[groups.groups[index].units]
        return Importance(criterion, reduction, scores, fallback_groups=missing)
    power = 1 if criterion == "l1" else 2
    scores, _ = _reduce_over_spaces(groups, weights, _MAGNITUDE_ROLES, power=power, reduction=reduction)
    return Importance(criterion, reduction, scores)


def _reduce_over_spaces(groups, weights, roles, power: int, reduction: str) -> tuple[np.ndarray, np.ndarray]:
    """Per unit: reduce, over the weight axes it appears in, the sum of |w|^power over its slice."""
    total = np.zeros(groups.num_units)
    count = np.zeros(groups.num_units)
    peak = np.zeros(groups.num_units)
    for space_id, units in groups.space_units.items():
        space = groups.spaces[space_id]
        if not space.is_param or space.role not in roles:
            continue
        array = np.abs(weights[space.value].numpy().astype(np.float64))
        if power != 1:
            array = array**power
        per_index = np.moveaxis(array, space.axis, 0).reshape(space.size, -1).sum(axis=1)
        valid = units >= 0
        per_unit = np.bincount(units[valid], weights=per_index[valid], minlength=groups.num_units)
        present = np.bincount(units[valid], minlength=groups.num_units) > 0
        total += per_unit
        count += present
        peak = np.maximum(peak, per_unit)
    covered = count > 0
    if reduction == "sum":
        return total, covered
    if reduction == "max":
        return peak, covered
    return np.divide(total, count, out=np.zeros_like(total), where=covered), covered


@dataclass
class ScoreImportance(ir.passes.InPlacePass):
    """Analysis: score every unit (stores `Importance`; needs `DependencyGroups`)."""

    criterion: str = "l2"
    reduction: str = "mean"
    seed: int = 0

    def requires(self, model: ir.Model) -> None:
        fetch(model, DependencyGroups)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        groups = fetch(model, DependencyGroups)
        store(model, score_units(model, groups, self.criterion, self.reduction, self.seed))
        return ir.passes.PassResult(model, modified=False)
