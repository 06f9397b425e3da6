"""Rank allocation: how much rank each factorisable layer keeps under a global budget.

Ranks are chosen like widths. `--sparsity S` is the fraction of the `--budget` cost of the factorisable
layers removed: their weights (`params`), their MACs (`macs`), or the model's measured latency
(`latency`, from `RankLatency`). Factorising one layer changes no other, so a choice's saving is the sum
of its layers' savings, exactly for params and MACs.

- `uniform`: every layer keeps the same fraction of its full rank, the fraction found by bisection so the
  total meets the budget;
- `energy`: every layer keeps the smallest rank whose singular values hold a fraction of its spectrum's
  energy Σσ², one fraction for all layers, found by bisection (layers whose spectrum decays fast give up
  more rank);
- `dp`: the rate-distortion DP of the channel allocator (`solve_rate_distortion`) over each layer's
  options (left whole, or any saving rank), the distortion interpolated from the measured
  `RankSensitivity` curves; the allocation's distortion measured with every layer factorised at once is
  recorded next to the DP's summed prediction (the additivity check).

A layer is left whole where its rank would not save cost (r·(outputs + reduction) ≥ outputs·reduction, or
no measured latency saving).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from pcc.compiler.calibration import CalibrationData
from pcc.compiler.errors import InvalidRequestError
from pcc.compiler.options import BUDGETS, RANK_ALLOCATORS, check_sparsity
from pcc.passes.allocation.allocation import search_monotone
from pcc.passes.allocation.rate_distortion import solve_rate_distortion
from pcc.passes.analysis.rank_sensitivity import RankLatency, RankSensitivity
from pcc.passes.analysis.sensitivity import output_distortion, resolve_metric
from pcc.passes.results import fetch, store
from pcc.passes.transforms.factorize_lowrank import (
    Decomposition, LowRankLayer, decompose, factorizable_layers, low_rank_weight,
)
from pcc.passes.transforms.sparsify_weights import sparse_weight_layers

__all__ = ["AllocateRanks", "RankAllocation", "RankCost", "RankMeter", "allocate_ranks", "decompositions"]

_COST_BINS = 2000  # resolution of the DP's discretised budget
_BAND = 0.02  # the DP may remove this fraction of the cost more than asked, no more
_MAX_OPTIONS = 64  # ranks considered per layer by the DP (evenly spread when a layer has more)
_GUARD_SLACK = 0.01  # a simple allocator's answer competes if it removes at least the DP's fraction less this


class RankCost:
    """The budget's cost of the factorisable layers at given ranks (`None`: left whole)."""

    def __init__(self, budget: str, layers: Sequence[LowRankLayer], latency: RankLatency | None = None) -> None:
        if budget == "latency" and latency is None:
            raise ValueError("the latency budget needs a RankLatency (MeasureRankLatency)")
        self.budget, self.layers, self.latency = budget, list(layers), latency
        if budget == "params":
            self.total = float(sum(layer.dense_params for layer in layers))
        elif budget == "macs":
            self.total = float(sum(layer.macs(None) for layer in layers))
        else:
            self.total = latency.dense_ms

    def saving(self, index: int, rank: int | None) -> float:
        layer = self.layers[index]
        if self.budget == "params":
            return float(layer.dense_params - layer.params(rank))
        if self.budget == "macs":
            return float(layer.macs(None) - layer.macs(rank))
        return self.latency.saved(layer.weight, rank)

    def effective(self, index: int, rank: int | None) -> int | None:
        """The rank, or `None` where it saves nothing (the layer is then left whole)."""
        if rank is None or not self.layers[index].saves(rank) or self.saving(index, rank) <= 0:
            return None
        return rank

    def removed_fraction(self, ranks: Sequence[int | None]) -> float:
        return sum(self.saving(i, r) for i, r in enumerate(ranks)) / self.total if self.total else 0.0


@dataclass
class RankAllocation:
    """The rank each factorisable layer keeps (`None`: left whole), and what that removes of the budget."""

    META_KEY = "pcc.rank_allocation"
    PRODUCED_BY = "AllocateRanks"

    method: str  # uniform | energy | dp
    budget: str
    target: float
    layers: list[LowRankLayer]
    ranks: list[int | None]
    cost_before: float
    cost_after: float
    reachable: float  # the most the budget allows removing (every layer at its lowest rank)
    setting: float | None = None  # uniform: the kept fraction of rank; energy: the kept fraction of energy
    predicted_distortion: float | None = None  # dp: the sum of the single-layer distortions
    measured_distortion: float | None = None  # dp: every layer factorised at once, on the calibration data
    candidates: dict[str, float] = field(default_factory=dict)  # dp: each allocator's measured distortion
    kept_from: str | None = None  # dp: the allocator whose answer measured least, when not the DP's own

    @property
    def achieved(self) -> float:
        return 1.0 - self.cost_after / self.cost_before if self.cost_before else 0.0

    def ranks_by_weight(self) -> dict[str, int | None]:
        return {layer.weight: rank for layer, rank in zip(self.layers, self.ranks)}

    def summary(self) -> str:
        whole = sum(rank is None for rank in self.ranks)
        setting = {"uniform": "rank kept", "energy": "energy kept"}.get(self.method)
        text = (f"ranks ({self.method}, {self.budget}): -{100 * self.achieved:.1f}% of the factorisable layers' "
                f"{self.budget} (target {100 * self.target:.1f}%), {len(self.ranks) - whole}/{len(self.ranks)} layers "
                f"factorised, {whole} left whole")
        if setting and self.setting is not None:
            text += f"; {100 * self.setting:.2f}% {setting}"
        if self.candidates:
            measured = ", ".join(f"{name} {value:.4g}" for name, value in self.candidates.items())
            text += (f"; distortion: the DP's summed prediction {self.predicted_distortion:.4g}, measured {measured}; "
                     f"kept {self.kept_from or 'dp'}")
        return text


def decompositions(model: ir.Model, layers: Sequence[LowRankLayer]) -> dict[str, Decomposition]:
    """Each layer's SVD, by weight name."""
    wanted = {layer.weight for layer in layers}
    return {layer.weight.name: decompose(layer.matrix()) for layer in sparse_weight_layers(model) if layer.weight.name in wanted}


def allocate_ranks(
    method: str, sparsity: float, cost: RankCost, spectra: Sequence[np.ndarray] | None = None,
    sensitivity: RankSensitivity | None = None,
) -> RankAllocation:
    """The ranks `method` keeps to remove `sparsity` of `cost` (energy needs `spectra`, dp `sensitivity`)."""
    layers = cost.layers
    lowest = [cost.effective(i, 1) for i in range(len(layers))]
    reachable = cost.removed_fraction(lowest)
    setting = None
    if sparsity == 0 or not layers:
        ranks: list[int | None] = [None] * len(layers)
    elif method == "uniform":
        def at(kept: float) -> list[int | None]:
            return [cost.effective(i, max(1, round(kept * layer.full_rank))) for i, layer in enumerate(layers)]

        setting = 1.0 - search_monotone(lambda x: cost.removed_fraction(at(1.0 - x)), sparsity, 0.0, 1.0)
        ranks = at(setting)
    elif method == "energy":
        cumulative = [np.cumsum(s**2) / max(float(np.sum(s**2)), 1e-300) for s in spectra]

        def at(kept: float) -> list[int | None]:
            return [cost.effective(i, int(min(np.searchsorted(c, kept - 1e-12) + 1, len(c)))) for i, c in enumerate(cumulative)]

        setting = 1.0 - search_monotone(lambda x: cost.removed_fraction(at(1.0 - x)), sparsity, 0.0, 1.0, steps=60)
        ranks = at(setting)
    elif method == "dp":
        ranks = _dp(sparsity, cost, sensitivity)
        if ranks is None:  # out of reach: the lowest ranks
            ranks = lowest
    else:
        raise InvalidRequestError(f"unknown rank allocator {method!r}; choose from {', '.join(RANK_ALLOCATORS)}")
    allocation = RankAllocation(
        method=method, budget=cost.budget, target=sparsity, layers=list(layers), ranks=ranks, cost_before=cost.total,
        cost_after=cost.total * (1.0 - cost.removed_fraction(ranks)), reachable=reachable, setting=setting,
    )
    if method == "dp":
        allocation.predicted_distortion = sum(sensitivity.at(l.weight, r) for l, r in zip(layers, ranks))
    return allocation


def _dp(sparsity: float, cost: RankCost, sensitivity: RankSensitivity) -> list[int | None] | None:
    """Minimum summed distortion with the summed saving within [target, target + band]; None if unreachable."""
    options: list[list[int | None]] = []
    for index, layer in enumerate(cost.layers):
        ranks = range(1, layer.max_saving_rank + 1)
        if len(ranks) > _MAX_OPTIONS:
            ranks = np.unique(np.r_[np.round(np.linspace(1, layer.max_saving_rank, _MAX_OPTIONS)), sensitivity.ranks.get(layer.weight, [])])
        options.append([None] + [r for r in (cost.effective(index, int(r)) for r in ranks) if r is not None])
    width = max(len(o) for o in options)
    distortion = np.full((len(options), width), np.inf)
    saving = np.zeros((len(options), width))
    for row, (layer, choices) in enumerate(zip(cost.layers, options)):
        for column, rank in enumerate(choices):
            distortion[row, column] = sensitivity.at(layer.weight, rank)
            saving[row, column] = cost.saving(row, rank)
    step = cost.total / _COST_BINS
    required = math.ceil(sparsity * cost.total / step - 1e-9)
    picks, total = solve_rate_distortion(distortion, np.floor(saving / step).astype(np.int64), required,
                                         required + int(_BAND * _COST_BINS))
    if not np.isfinite(total):
        return None
    return [choices[pick] for choices, pick in zip(options, picks)]


class RankMeter:
    """Measures whole rank allocations: the model with every layer at its rank at once (weights replaced by
    their approximations, which computes what the factorised graph computes) against the dense model on
    every calibration sample. The dense outputs and each layer's SVD are computed once."""

    def __init__(self, model: ir.Model, layers: Sequence[LowRankLayer], calibration: CalibrationData, metric: str = "auto") -> None:
        from pcc.backends.onnx.runtime import session

        self.model, self.batches = model, list(calibration)
        self.decompositions = decompositions(model, layers)
        dense = session(ir.serde.serialize_model(model).SerializeToString())
        self.reference = [dense.run(None, batch) for batch in self.batches]
        self.metric = resolve_metric(metric, self.reference)

    def distortion(self, ranks: Mapping[str, int | None]) -> float:
        from pcc.backends.onnx.runtime import session

        variant = self.model.clone()
        for layer in sparse_weight_layers(variant):
            rank = ranks.get(layer.weight.name)
            if rank is not None:
                approx = low_rank_weight(layer, rank, self.decompositions[layer.weight.name])
                layer.weight.const_value = ir.tensor(approx, name=layer.weight.name)
        approx = session(ir.serde.serialize_model(variant).SerializeToString())
        return output_distortion(self.reference, [approx.run(None, batch) for batch in self.batches], self.metric)


@dataclass
class AllocateRanks(ir.passes.InPlacePass):
    """Choose each factorisable layer's rank (stores a `RankAllocation` for `FactorizeLowRank`).

    `method` is `uniform`, `energy` or `dp` (needs `RankSensitivity` from `MeasureRankSensitivity`);
    `budget` is `params`, `macs` or `latency` (needs `RankLatency` from `MeasureRankLatency`); `only`
    restricts the layers to these weight names.

    The DP's answer is measured whole on `calibration`; with `guard` (the default), so are uniform's and
    energy's at the same budget, and the lowest measured distortion wins, as for the channel DP: summed
    single-layer distortions are a prediction, and the DP never returns an allocation that measures worse
    than the simple ones (`RankAllocation.candidates`, `kept_from`).
    """

    sparsity: float = 0.5
    budget: str = "params"
    method: str = "uniform"
    calibration: CalibrationData | None = field(default=None, repr=False)
    only: frozenset[str] | None = None
    guard: bool = True

    def requires(self, model: ir.Model) -> None:
        check_sparsity(self.sparsity)
        if self.budget not in BUDGETS:
            raise InvalidRequestError(f"unknown budget {self.budget!r}; choose from {', '.join(BUDGETS)}")
        if self.method not in RANK_ALLOCATORS:
            raise InvalidRequestError(f"unknown rank allocator {self.method!r}; choose from {', '.join(RANK_ALLOCATORS)}")
        if self.method == "dp":
            fetch(model, RankSensitivity)
        if self.budget == "latency":
            fetch(model, RankLatency)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        layers = [layer for layer in factorizable_layers(model, self.only) if layer.max_saving_rank > 0]
        if self.sparsity > 0 and not layers:
            raise InvalidRequestError("--factorize lowrank: the model has no Conv (groups 1), Gemm or MatMul weight "
                                      "whose factorisation would save anything")
        cost = RankCost(self.budget, layers, fetch(model, RankLatency) if self.budget == "latency" else None)
        if self.method == "dp" and self.sparsity > 0:
            allocation = self._dp(model, layers, cost)
        else:
            spectra = [d.singular for d in decompositions(model, layers).values()] if self.method == "energy" else None
            allocation = allocate_ranks(self.method, self.sparsity, cost, spectra)
        store(model, allocation)
        return ir.passes.PassResult(model, modified=False)

    def _dp(self, model: ir.Model, layers: list[LowRankLayer], cost: RankCost) -> RankAllocation:
        sensitivity = fetch(model, RankSensitivity)
        meter = RankMeter(model, layers, self.calibration or CalibrationData.random(model), sensitivity.metric)
        dp = allocate_ranks("dp", self.sparsity, cost, sensitivity=sensitivity)
        dp.measured_distortion = meter.distortion(dp.ranks_by_weight())
        dp.candidates = {"dp": dp.measured_distortion}
        winner = dp
        spectra = [meter.decompositions[layer.weight].singular for layer in layers]
        for name in ("uniform", "energy") if self.guard else ():
            other = allocate_ranks(name, self.sparsity, cost, spectra)
            other.measured_distortion = dp.candidates[name] = meter.distortion(other.ranks_by_weight())
            tighter = other.achieved >= min(dp.achieved, self.sparsity) - _GUARD_SLACK
            if tighter and other.measured_distortion < winner.measured_distortion:
                winner = other
        if winner is not dp:
            winner.kept_from, winner.method = winner.method, "dp"
            winner.predicted_distortion, winner.candidates = dp.predicted_distortion, dp.candidates
        return winner
