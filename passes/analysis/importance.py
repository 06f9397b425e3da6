"""Importance: one score per unit, computed over every weight slice of the unit's whole group.

A unit's channels appear in several layers (the producer's output rows, the consumers' input columns,
norm scales). Every criterion turns each of those weights into a per-element score, sums it over the
unit's slice, then reduces across the weights (mean, sum or max), as DepGraph's group importance does:

- `l1`, `l2`: |w| and w^2.
- `bn`: the normalisation scale |gamma|. Exporters in eval mode usually fold BatchNorm into the
  convolution; groups without a norm scale fall back to L2 and are listed in `fallback_groups`.
- `lamp`: L2, rescaled within each group as in LAMP (Lee et al., 2021): a unit's score divided by the sum
  of the scores not smaller than it, which makes scores comparable across layers.
- `taylor`: first-order Taylor, |w * dL/dw| with the gradient summed over the calibration data.
- `hessian`: OBD's saliency w^2 * H_ww / 2 with the Hessian diagonal approximated by the empirical Fisher
  (squared per-batch gradients).
- `activation`: mean |output| of each channel of the layers producing it, over the calibration data.
- `flap`: FLAP's fluctuation, Var(x_j)·||W[:, j]||² of the unit's input features in the layers reading it,
  standardised per group so one global ranking compares layers (`flap.py`; `fallback_groups`: groups no
  linear layer reads, scored at their mean).

Gradients come from the differentiable copy of the IR (`pcc.compiler.torch_module`). The loss is the
cross-entropy with the calibration labels when given; otherwise, for a classifier (a 2-D first
output), with the dense model's own predictions; otherwise half the mean squared output.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from pcc.compiler.calibration import CalibrationData
from pcc.compiler.options import CRITERIA, DATA_CRITERIA, REDUCTIONS
from pcc.passes.analysis.channel_rules import Role
from pcc.passes.analysis.dependency_groups import DependencyGroups
from pcc.passes.results import fetch, store

__all__ = [
    "lamp_within",
    "CRITERIA",
    "DATA_CRITERIA",
    "REDUCTIONS",
    "Importance",
    "ScoreImportance",
    "lamp_scores",
    "score_units",
]

_WEIGHT_ROLES = {Role.OUT, Role.IN, Role.SCALE, Role.NORM_SCALE}
_PRODUCER_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}


@dataclass
class Importance:
    """Scores of every unit (global unit ids of `DependencyGroups`); higher means keep."""

    META_KEY = "pcc.importance"
    PRODUCED_BY = "ScoreImportance"

    criterion: str
    reduction: str
    scores: np.ndarray
    fallback_groups: list[int] = field(default_factory=list)
    synthetic_data: bool = False  # scored on random inputs: data-driven criteria saw no real signal

    def of_group(self, groups: DependencyGroups, index: int) -> np.ndarray:
        return self.scores[groups.groups[index].units]


def score_units(
    model: ir.Model,
    groups: DependencyGroups,
    criterion: str = "l2",
    reduction: str = "mean",
    seed: int = 0,
    calibration: CalibrationData | None = None,
    progress: bool = False,
) -> Importance:
    if criterion not in CRITERIA:
        raise ValueError(f"unknown importance criterion {criterion!r}; choose from {', '.join(CRITERIA)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; choose from {', '.join(REDUCTIONS)}")
    if criterion == "random":
        return Importance(criterion, reduction, np.random.default_rng(seed).random(groups.num_units))
    if criterion == "flap":
        from pcc.passes.analysis.flap import fluctuation_scores

        calibration = calibration if calibration is not None else CalibrationData.random(model, seed=seed)
        scores, unscored = fluctuation_scores(model, groups, calibration)
        return Importance(criterion, reduction, scores, fallback_groups=unscored, synthetic_data=calibration.synthetic)
    weights = {name: value.const_value.numpy() for name, value in model.graph.initializers.items()}
    if criterion in DATA_CRITERIA:
        if calibration is None:
            calibration = CalibrationData.random(model, seed=seed)
        scores = _data_scores(model, groups, criterion, reduction, weights, calibration, progress)
        return Importance(criterion, reduction, scores, synthetic_data=calibration.synthetic)
    if criterion == "bn":
        scores, covered = _reduce_over_weights(groups, lambda name: np.abs(weights[name]), {Role.NORM_SCALE}, reduction)
        missing = [g.index for g in groups.groups if not covered[g.units].all()]
        if missing:
            l2, _ = _reduce_over_weights(groups, lambda name: weights[name] ** 2, _WEIGHT_ROLES, reduction)
            for index in missing:
                scores[groups.groups[index].units] = l2[groups.groups[index].units]
        return Importance(criterion, reduction, scores, fallback_groups=missing)
    if criterion == "l1":
        scores, _ = _reduce_over_weights(groups, lambda name: np.abs(weights[name]), _WEIGHT_ROLES, reduction)
        return Importance(criterion, reduction, scores)
    scores, _ = _reduce_over_weights(groups, lambda name: weights[name].astype(np.float64) ** 2, _WEIGHT_ROLES, reduction)
    return Importance(criterion, reduction, lamp_scores(groups, scores) if criterion == "lamp" else scores)


def lamp_scores(groups: DependencyGroups, scores: np.ndarray) -> np.ndarray:
    """Within each group: score / sum of the group's scores that are >= it (LAMP)."""
    lamp = np.zeros_like(scores, dtype=np.float64)
    for group in groups.groups:
        lamp[group.units] = lamp_within(scores[group.units])
    return lamp


def lamp_within(scores: np.ndarray) -> np.ndarray:
    """LAMP over one layer's units: each score / the sum of the layer's scores at least as large."""
    own = np.asarray(scores, dtype=np.float64)
    order = np.argsort(own, kind="stable")
    tail = np.cumsum(own[order][::-1])[::-1]  # sum of this and every larger score
    lamp = np.empty_like(own)
    lamp[order] = np.divide(own[order], tail, out=np.zeros_like(tail), where=tail > 0)
    return lamp


def _reduce_over_weights(
    groups: DependencyGroups, element_score: Callable[[str], np.ndarray], roles: set[Role], reduction: str
) -> tuple[np.ndarray, np.ndarray]:
    """Per unit: reduce, over the weights it appears in, the sum of its elements' scores in each."""
    per_space = []
    for space_id, units in groups.space_units.items():
        space = groups.spaces[space_id]
        if space.is_param and space.role in roles:
            array = np.asarray(element_score(space.value), dtype=np.float64)
            per_index = np.moveaxis(array, space.axis, 0).reshape(space.size, -1).sum(axis=1)
            per_space.append((units, per_index))
    return _reduce_per_unit(groups.num_units, per_space, reduction)


def _reduce_per_unit(num_units: int, per_space, reduction: str) -> tuple[np.ndarray, np.ndarray]:
    """Sum each space's per-index scores into its units, then reduce across spaces."""
    total = np.zeros(num_units)
    count = np.zeros(num_units)
    peak = np.zeros(num_units)
    for units, per_index in per_space:
        valid = units >= 0
        per_unit = np.bincount(units[valid], weights=per_index[valid], minlength=num_units)
        present = np.bincount(units[valid], minlength=num_units) > 0
        total += per_unit
        count += present
        peak = np.maximum(peak, per_unit)
    covered = count > 0
    if reduction == "sum":
        return total, covered
    if reduction == "max":
        return peak, covered
    return np.divide(total, count, out=np.zeros_like(total), where=covered), covered


def _data_scores(model, groups, criterion, reduction, weights, calibration: CalibrationData, progress: bool) -> np.ndarray:
    import torch

    from pcc.compiler.torch_module import IRModule

    module = IRModule(model)
    if criterion == "activation":
        return _activation_scores(model, groups, module, reduction, calibration, progress)
    grad_sum = {name: torch.zeros_like(p) for name, p in module.named_weights()}
    grad_sq = {name: torch.zeros_like(p) for name, p in module.named_weights()}
    for feeds, labels in calibration.batches(f"{criterion} scores" if progress else None):
        module.zero_grad()
        outputs = module(feeds)
        _loss(outputs, labels).backward()
        for name, param in module.named_weights():
            if param.grad is not None:
                grad_sum[name] += param.grad
                grad_sq[name] += param.grad**2
    if criterion == "taylor":
        element = lambda name: np.abs(weights[name] * grad_sum[name].numpy())  # noqa: E731
    else:
        element = lambda name: 0.5 * weights[name].astype(np.float64) ** 2 * grad_sq[name].numpy()  # noqa: E731
    scores, _ = _reduce_over_weights(groups, element, _WEIGHT_ROLES, reduction)
    return scores


def _loss(outputs, labels):
    import torch
    import torch.nn.functional as F

    logits = outputs[0]
    if labels is not None:
        return F.cross_entropy(logits, torch.as_tensor(labels, dtype=torch.long))
    if logits.dim() == 2:
        return F.cross_entropy(logits, logits.detach().argmax(dim=1))
    return sum(0.5 * (o.float() ** 2).mean() for o in outputs if o.is_floating_point())


def _activation_scores(model, groups, module, reduction, calibration: CalibrationData, progress: bool) -> np.ndarray:
    import torch

    producers = {v.name for node in model.graph if node.op_type in _PRODUCER_OPS for v in node.outputs}
    spaces = [(sid, groups.spaces[sid]) for sid in groups.space_units if groups.spaces[sid].value in producers]
    sums = {sid: np.zeros(space.size) for sid, space in spaces}
    batches = 0
    with torch.no_grad():
        for feeds, _ in calibration.batches("activation scores" if progress else None):
            _, captured = module.run(feeds, capture={space.value for _, space in spaces})
            for sid, space in spaces:
                values = captured[space.value].abs().double()
                sums[sid] += values.movedim(space.axis, 0).reshape(space.size, -1).mean(dim=1).numpy()
            batches += 1
    per_space = [(groups.space_units[sid], sums[sid] / max(batches, 1)) for sid, _ in spaces]
    scores, _ = _reduce_per_unit(groups.num_units, per_space, reduction)
    return scores


@dataclass
class ScoreImportance(ir.passes.InPlacePass):
    """Analysis: score every unit (stores `Importance`; needs `DependencyGroups`).

    Data-driven criteria use `calibration`; without it they run on random inputs and say so in the
    result (`synthetic_data`).
    """

    criterion: str = "l2"
    reduction: str = "mean"
    seed: int = 0
    calibration: CalibrationData | None = field(default=None, repr=False)
    progress: bool = field(default=False, repr=False)

    def requires(self, model: ir.Model) -> None:
        fetch(model, DependencyGroups)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        groups = fetch(model, DependencyGroups)
        importance = score_units(model, groups, self.criterion, self.reduction, self.seed, self.calibration, self.progress)
        store(model, importance)
        return ir.passes.PassResult(model, modified=False)
