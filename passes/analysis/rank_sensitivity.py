"""Rank sensitivity and rank latency: each factorisable layer measured alone at a grid of ranks.

The rate-distortion DP chooses ranks the way it chooses widths (`passes/allocation/ranks.py`), from
per-layer curves: the output distortion of the model with only that layer's weight replaced by its
rank-r truncated SVD, on calibration data. The sweep reuses the channel sweep's machinery
(`passes/analysis/sensitivity.py`): a variant differs from the dense model only downstream of its layer,
so it runs as that region (`downstream_region`, `region_model`) fed the dense activations entering it;
the distortion is its metric (KL of the softmax for classifiers, relative squared error otherwise); and
each variant runs on as many samples as its standard error needs (`Sampling`). One thing is cheaper
than for channels: a rank changes a weight's values, not any shape, so the layer's weight is made an
input of its region and one onnxruntime session serves every rank of the layer.

`measure_rank_latency` times, for `--budget latency`, the whole model with one layer factorised at a few
ranks against the dense model (the channel latency table's paired timer). Unlike narrowing a channel
group, factorising a layer changes no other layer, so per-layer savings add up and need no whole-model
correction.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from pcc.compiler.calibration import CalibrationData
from pcc.passes.analysis.latency import Timer, onnxruntime_timer
from pcc.passes.analysis.regions import downstream_region, region_model
from pcc.passes.analysis.sensitivity import METRICS, Sampling, _Estimate, resolve_metric
from pcc.passes.results import store
from pcc.passes.transforms.factorize_lowrank import LowRankLayer, decompose, factorizable_layers, factorize, low_rank_weight
from pcc.passes.transforms.sparsify_weights import sparse_weight_layers

__all__ = [
    "DEFAULT_RANK_FRACTIONS",
    "MeasureRankLatency",
    "MeasureRankSensitivity",
    "RankLatency",
    "RankSensitivity",
    "measure_rank_latency",
    "measure_rank_sensitivity",
    "rank_grid",
]

# fractions of each layer's largest saving rank (finer at low rank, where distortion climbs fastest)
DEFAULT_RANK_FRACTIONS = (0.05, 0.1, 0.2, 0.3, 0.45, 0.6, 0.8, 1.0)


def rank_grid(layer: LowRankLayer, fractions: Sequence[float]) -> np.ndarray:
    """Distinct ranks at these fractions of the layer's largest saving rank (at least 1), ascending."""
    top = max(layer.max_saving_rank, 1)
    return np.unique(np.clip(np.round(np.asarray(fractions) * top).astype(np.int64), 1, top))


@dataclass
class RankSensitivity:
    """Per factorisable layer (by weight name): the output distortion at each measured rank.

    The layer left whole distorts nothing; `at` interpolates linearly in the rank between the measured
    points and up to 0 at the full rank (where the truncated SVD is exact)."""

    META_KEY = "pcc.rank_sensitivity"
    PRODUCED_BY = "MeasureRankSensitivity"

    metric: str
    ranks: dict[str, np.ndarray]  # weight -> measured ranks, ascending
    distortion: dict[str, np.ndarray]  # weight -> distortion at each
    samples: dict[str, np.ndarray] = field(default_factory=dict)  # calibration samples each variant ran on
    full_rank: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def at(self, weight: str, rank: int | None) -> float:
        if rank is None or weight not in self.ranks:
            return 0.0
        ranks = np.r_[self.ranks[weight], self.full_rank[weight]]
        return float(np.interp(rank, ranks, np.r_[self.distortion[weight], 0.0]))


def measure_rank_sensitivity(
    model: ir.Model,
    layers: Sequence[LowRankLayer],
    calibration: CalibrationData,
    fractions: Sequence[float] = DEFAULT_RANK_FRACTIONS,
    metric: str = "auto",
    sampling: Sampling = Sampling(),
    threads: int | None = None,
) -> RankSensitivity:
    """Each layer's distortion at `rank_grid(layer, fractions)`, every other layer dense."""
    from pcc.backends.onnx.runtime import session

    start = time.perf_counter()
    batches = list(calibration)
    dense = session(ir.serde.serialize_model(model).SerializeToString(), threads=threads)
    reference = [dense.run(None, feeds) for feeds in batches]
    metric = resolve_metric(metric, reference)
    output_names = [v.name for v in model.graph.outputs]
    upstream = _exposing(model, threads)
    weights = {layer.weight.name: layer for layer in sparse_weight_layers(model)}
    result = RankSensitivity(metric, {}, {}, full_rank={layer.weight: layer.full_rank for layer in layers})
    for layer in layers:
        region = downstream_region(model.graph, {layer.weight})
        sub = region_model(model, region)
        weight = sub.graph.initializers.pop(layer.weight)
        sub.graph.inputs.append(weight)  # fed each rank's approximation
        sess = session(ir.serde.serialize_model(sub).SerializeToString(), threads=threads)
        entering = [name for name in region.inputs if name not in batches[0]]
        places = [output_names.index(name) for name in region.outputs]
        ranks = rank_grid(layer, fractions)
        decomposition = decompose(weights[layer.weight].matrix())
        distortion, used = np.zeros(len(ranks)), np.zeros(len(ranks), dtype=np.int64)
        feeds: list[dict[str, np.ndarray]] = []  # entering activations, computed as far as a variant needs them
        for column, rank in enumerate(ranks):
            approx = low_rank_weight(weights[layer.weight], int(rank), decomposition)
            estimate = _Estimate()
            for index, ref in enumerate(reference):
                if index == len(feeds):
                    computed = dict(zip(entering, upstream.run(entering, batches[index]))) if entering else {}
                    feeds.append(computed | {n: batches[index][n] for n in region.inputs if n in batches[index]})
                outputs = list(ref)
                for place, value in zip(places, sess.run(list(region.outputs), feeds[index] | {layer.weight: approx})):
                    outputs[place] = value
                estimate.add(ref, outputs, metric)
                if sampling.settled(estimate):
                    break
            distortion[column], used[column] = estimate.value, estimate.samples
        result.ranks[layer.weight], result.distortion[layer.weight], result.samples[layer.weight] = ranks, distortion, used
    result.seconds = time.perf_counter() - start
    return result


def _exposing(model: ir.Model, threads: int | None):
    """A session of `model` that can also return any intermediate activation."""
    from pcc.backends.onnx.runtime import session

    copy = model.clone()
    outputs = {id(v) for v in copy.graph.outputs}
    copy.graph.outputs.extend(v for node in copy.graph for v in node.outputs if v is not None and id(v) not in outputs)
    return session(ir.serde.serialize_model(copy).SerializeToString(), threads=threads)


@dataclass
class MeasureRankSensitivity(ir.passes.InPlacePass):
    """Analysis: per factorisable layer (restricted to the weights in `only`), the distortion at a grid
    of ranks (stores `RankSensitivity`)."""

    calibration: CalibrationData | None = field(default=None, repr=False)
    fractions: tuple[float, ...] = DEFAULT_RANK_FRACTIONS
    metric: str = "auto"
    sampling: Sampling = Sampling()
    only: frozenset[str] | None = None

    def requires(self, model: ir.Model) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"unknown metric {self.metric!r}; choose from {', '.join(METRICS)}")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        calibration = self.calibration or CalibrationData.random(model)
        layers = [layer for layer in factorizable_layers(model, self.only) if layer.max_saving_rank > 0]
        store(model, measure_rank_sensitivity(model, layers, calibration, self.fractions, self.metric, self.sampling))
        return ir.passes.PassResult(model, modified=False)


@dataclass
class RankLatency:
    """Milliseconds saved by factorising each layer alone at each measured rank (0: none, or slower)."""

    META_KEY = "pcc.rank_latency"
    PRODUCED_BY = "MeasureRankLatency"

    dense_ms: float
    ranks: dict[str, np.ndarray]  # weight -> measured ranks, ascending
    saved_ms: dict[str, np.ndarray]  # weight -> ms saved at each (non-increasing in the rank)

    def saved(self, weight: str, rank: int | None) -> float:
        """Interpolated linearly between the measured ranks; above the largest (the largest rank that saves
        weights) nothing is saved: the layer is left whole."""
        if rank is None or weight not in self.ranks:
            return 0.0
        return float(np.interp(rank, self.ranks[weight], self.saved_ms[weight], right=0.0))


def measure_rank_latency(
    model: ir.Model,
    layers: Sequence[LowRankLayer],
    timer: Timer | None = None,
    fractions: Sequence[float] = (0.1, 0.3, 0.6, 1.0),
) -> RankLatency:
    """Time the model with each layer alone factorised at `rank_grid(layer, fractions)` against the dense
    model; savings are made non-increasing in the rank (noise can make a lower rank look slower)."""
    timer = timer or onnxruntime_timer()
    dense = ir.serde.serialize_model(model).SerializeToString()
    dense_times, ranks, saved = [], {}, {}
    for layer in layers:
        grid = rank_grid(layer, fractions)
        values = np.zeros(len(grid))
        for column, rank in enumerate(grid):
            variant = model.clone()
            factorize(variant, {layer.weight: int(rank)})
            dense_ms, variant_ms = timer(dense, ir.serde.serialize_model(variant).SerializeToString(), None)
            dense_times.append(dense_ms)
            values[column] = max(dense_ms - variant_ms, 0.0)
        ranks[layer.weight], saved[layer.weight] = grid, np.maximum.accumulate(values[::-1])[::-1]
    return RankLatency(float(np.median(dense_times)) if dense_times else 0.0, ranks, saved)


@dataclass
class MeasureRankLatency(ir.passes.InPlacePass):
    """Analysis: the latency each factorisable layer (in `only`) saves at a few ranks, timed in onnxruntime
    at batch `batch` (stores `RankLatency`)."""

    repeats: int = 20
    batch: int = 1
    only: frozenset[str] | None = None

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        layers = [layer for layer in factorizable_layers(model, self.only) if layer.max_saving_rank > 0]
        store(model, measure_rank_latency(model, layers, onnxruntime_timer(self.repeats, self.batch)))
        return ir.passes.PassResult(model, modified=False)
