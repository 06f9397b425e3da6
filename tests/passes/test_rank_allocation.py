"""Rank allocation for --factorize lowrank: uniform, energy and the rate-distortion DP under params, MACs and latency."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from pcc.compiler.calibration import CalibrationData
from pcc.compiler.pipeline import factorize_passes
from pcc.compiler.errors import InvalidRequestError
from pcc.compiler.frontend import load_onnx
from pcc.compiler.options import CompileOptions
from pcc.compiler.pipeline import Pipeline, preparation_passes
from pcc.passes.allocation.ranks import AllocateRanks, RankAllocation, RankMeter
from pcc.passes.analysis.cost import count_macs, measure_cost
from pcc.passes.analysis.rank_sensitivity import (
    MeasureRankLatency, MeasureRankSensitivity, RankLatency, RankSensitivity, measure_rank_latency,
)
from pcc.passes.analysis.sensitivity import Sampling
from pcc.passes.transforms.factorize_lowrank import FactorizeLowRank, decompose, factorizable_layers

CNN = Path(__file__).resolve().parents[2] / "examples" / "models" / "fashion_cnn.onnx"  # trained, 91.2% top-1


@pytest.fixture(scope="module")
def cnn() -> ir.Model:
    model = load_onnx(CNN)
    Pipeline(preparation_passes()).run(model)
    return model


@pytest.fixture(scope="module")
def calibration(cnn) -> CalibrationData:
    return CalibrationData.random(cnn, samples=64, seed=0)


@pytest.fixture(scope="module")
def swept(cnn, calibration) -> ir.Model:
    model = cnn.clone()
    MeasureRankSensitivity(calibration, fractions=(0.1, 0.3, 0.6, 1.0), sampling=Sampling(min_samples=64))(model)
    return model


def _allocate(model: ir.Model, **kwargs) -> RankAllocation:
    AllocateRanks(**kwargs)(model)
    return model.meta[RankAllocation.META_KEY]


@pytest.mark.parametrize("method", ["uniform", "energy", "dp"])
def test_each_allocator_meets_the_params_budget_and_the_factorised_model_matches_it(swept, calibration, method):
    model = swept.clone()
    model.meta.update(swept.meta)
    allocation = _allocate(model, sparsity=0.5, method=method, calibration=calibration)
    assert allocation.achieved == pytest.approx(0.5, abs=0.02)
    before = measure_cost(model).params
    FactorizeLowRank()(model)
    assert before - measure_cost(model).params == pytest.approx(allocation.cost_before - allocation.cost_after)
    factorised = sum(rank is not None for rank in allocation.ranks)
    assert factorised == sum(node.name.endswith(".lowrank") for node in model.graph) > 0


def test_energy_keeps_one_fraction_of_each_spectrum(cnn):
    model = cnn.clone()
    allocation = _allocate(model, sparsity=0.4, method="energy")
    layers = {layer.weight: layer for layer in factorizable_layers(model)}
    for weight, rank in allocation.ranks_by_weight().items():
        if rank is None:
            continue
        matrix = model.graph.initializers[weight].const_value.numpy()
        energy = np.cumsum(decompose(matrix.reshape(matrix.shape[0], -1)).singular ** 2)
        energy /= energy[-1]
        # the smallest rank holding the fraction (Gemm weights are [outputs, inputs] already)
        assert energy[rank - 1] >= allocation.setting - 1e-9 and (rank == 1 or energy[rank - 2] < allocation.setting)
        assert rank <= layers[weight].max_saving_rank
    assert 0.5 < allocation.setting < 1


def test_the_dp_beats_uniform_and_keeps_the_least_measured_distortion(swept, calibration):
    sensitivity = swept.meta[RankSensitivity.META_KEY]
    assert len(sensitivity.ranks) == 6 and all((d >= 0).all() for d in sensitivity.distortion.values())
    model = swept.clone()
    model.meta.update(swept.meta)
    allocation = _allocate(model, sparsity=0.5, method="dp", calibration=calibration)
    candidates = allocation.candidates
    assert set(candidates) == {"dp", "uniform", "energy"} and allocation.predicted_distortion > 0
    meter = RankMeter(swept, factorizable_layers(swept), calibration, sensitivity.metric)
    assert meter.distortion(allocation.ranks_by_weight()) == pytest.approx(allocation.measured_distortion)
    assert allocation.measured_distortion == pytest.approx(min(candidates.values()))
    assert candidates["dp"] < candidates["uniform"]  # uniform rank costs the first convolutions dearly
    assert allocation.method == "dp" and allocation.kept_from in (None, "uniform", "energy")


def test_macs_budget_and_sparsity_zero(cnn):
    model = cnn.clone()
    allocation = _allocate(model, sparsity=0.3, budget="macs", method="uniform")
    assert allocation.achieved == pytest.approx(0.3, abs=0.02)
    macs = sum(layer.macs(None) for layer in factorizable_layers(model))
    before = count_macs(model)
    FactorizeLowRank()(model)
    assert (before - count_macs(model)) / macs == pytest.approx(allocation.achieved, abs=1e-9)
    assert _allocate(cnn.clone(), sparsity=0.0, method="energy").ranks == [None] * 6


def test_latency_budget_uses_the_measured_savings(cnn):
    """A stand-in timer (milliseconds = MACs / 1e6) makes the measured table exact and checkable."""

    def timer(dense: bytes, variant: bytes, feeds=None) -> tuple[float, float]:
        import onnx

        def ms(data: bytes) -> float:
            return count_macs(ir.serde.deserialize_model(onnx.load_from_string(data))) / 1e6

        return ms(dense), ms(variant)

    layers = factorizable_layers(cnn)
    table = measure_rank_latency(cnn, layers, timer, fractions=(0.3, 1.0))
    assert table.dense_ms == pytest.approx(count_macs(cnn) / 1e6)
    for layer in layers:
        rank = int(table.ranks[layer.weight][0])
        assert table.saved(layer.weight, rank) == pytest.approx((layer.macs(None) - layer.macs(rank)) / 1e6)
    model = cnn.clone()
    model.meta[RankLatency.META_KEY] = table
    allocation = _allocate(model, sparsity=0.25, budget="latency", method="uniform")
    assert allocation.cost_before == table.dense_ms and allocation.achieved == pytest.approx(0.25, abs=0.03)


def test_options_and_passes_for_factorize():
    options = CompileOptions(0.5, factorize="lowrank", allocator="dp", budget="latency")
    assert options.group_kinds == ()
    assert [type(p).__name__ for p in factorize_passes(options)] == [
        "MeasureRankLatency", "MeasureRankSensitivity", "AllocateRanks", "FactorizeLowRank"
    ]
    assert factorize_passes(CompileOptions(0.5)) == []
    assert isinstance(factorize_passes(CompileOptions(0.5, factorize="lowrank", allocator="energy"))[0], AllocateRanks)
    for bad in ({"allocator": "global"}, {"sparsify": "unstructured"}, {"prune": ("heads",)}, {"factorize": "tucker"}):
        with pytest.raises(InvalidRequestError):
            CompileOptions(0.5, **{"factorize": "lowrank", **bad})
    with pytest.raises(InvalidRequestError):
        CompileOptions(0.5, allocator="energy")  # energy chooses ranks, not widths
    assert MeasureRankLatency().only is None
