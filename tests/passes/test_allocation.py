"""Allocators: budgets met on exact parameter counts, never an empty layer, round_to respected."""

from __future__ import annotations

import pytest

from pcc.compiler.errors import InvalidRequestError
from pcc.compiler.pipeline import Pipeline, channel_pruning_pipeline, preparation_passes
from pcc.passes.allocation import AllocateGlobal, AllocateLAMP, AllocateUniform, Allocation
from pcc.passes.allocation.allocation import check_sparsity
from pcc.passes.analysis import BuildDependencyGroups, DependencyGroups, ScoreImportance


def _allocate(model, allocator, round_to=1):
    result = Pipeline([*preparation_passes(), BuildDependencyGroups(round_to), ScoreImportance(), allocator]).run(model)
    return result.get(DependencyGroups), result.get(Allocation)


@pytest.mark.parametrize("allocator", [AllocateUniform, AllocateGlobal, AllocateLAMP])
@pytest.mark.parametrize("budget", ["params", "macs"])
@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.8])
def test_budget_is_met_and_no_group_is_emptied(zoo_cache, allocator, budget, sparsity):
    for name in ("resnet_bottleneck", "yolo_neck", "densenet"):
        groups, allocation = _allocate(zoo_cache.model(name), allocator(sparsity, budget=budget))
        if budget == "params":
            assert allocation.cost_before == groups.prunable_params  # one definition of "prunable"
        assert abs(allocation.achieved - sparsity) <= 0.02 or allocation.achieved >= allocation.reachable - 1e-9, name
        for group in groups.groups:
            assert allocation.keep_units[group.index] >= 1
        for units in groups.space_units.values():  # no tensor axis loses every element
            assert (units < 0).any() or not allocation.removed[units].all()


def test_uniform_keeps_the_same_fraction_everywhere(zoo_cache):
    groups, allocation = _allocate(zoo_cache.model("vgg"), AllocateUniform(0.5))
    fractions = [allocation.keep_units[g.index] / g.num_units for g in groups.groups if g.num_units >= 16]
    assert max(fractions) - min(fractions) <= 1 / 16 + 1e-9


def test_global_ranking_prunes_unevenly(zoo_cache):
    groups, allocation = _allocate(zoo_cache.model("resnet_bottleneck"), AllocateGlobal(0.5))
    fractions = [allocation.keep_units[g.index] / g.num_units for g in groups.groups]
    assert max(fractions) - min(fractions) > 0.1


def test_round_to_keeps_multiples(zoo_cache):
    groups, allocation = _allocate(zoo_cache.model("resnet_bottleneck"), AllocateUniform(0.5), round_to=8)
    for group in groups.groups:
        kept = allocation.keep_units[group.index]
        assert kept == group.num_units or kept % group.unit_multiple == 0


def test_sparsity_zero_keeps_everything_even_with_round_to(zoo_cache):
    """A group of 18 channels with round_to 8 must not become 16 when nothing is to be pruned."""
    for allocator in (AllocateUniform(0.0), AllocateGlobal(0.0)):
        groups, allocation = _allocate(zoo_cache.model("mobilenet_v3"), allocator, round_to=8)
        assert any(g.num_units % 8 for g in groups.groups)
        assert not allocation.removed.any()


def test_grouped_conv_units_make_round_to_coarser(zoo_cache):
    groups, _ = _allocate(zoo_cache.model("regnet"), AllocateUniform(0.5), round_to=16)
    grouped = [g for g in groups.groups if g.channels_per_unit == 8]
    assert grouped and all(g.unit_multiple == 2 for g in grouped)


def test_unreachable_target_reports_best(zoo_cache):
    groups, allocation = _allocate(zoo_cache.model("regnet"), AllocateUniform(0.97))
    assert allocation.reachable < 0.97
    assert allocation.achieved == pytest.approx(allocation.reachable, abs=0.02)
    assert "best reachable" in allocation.summary()


@pytest.mark.parametrize("bad", [1.0, -0.01, 2.0, float("nan")])
def test_sparsity_range(bad):
    with pytest.raises(InvalidRequestError):
        check_sparsity(bad)


def test_allocator_checks_sparsity_in_a_pipeline(zoo_cache):
    with pytest.raises(InvalidRequestError, match="sparsity"):
        channel_pruning_pipeline(1.2).run(zoo_cache.model("mlp"))


def test_sparsity_is_params_not_channels(zoo_cache):
    """Removing a fraction r of channels removes about 1-(1-r)^2 of the weights: the ratio is solved for."""
    groups, allocation = _allocate(zoo_cache.model("vgg"), AllocateUniform(0.5))
    channel_fraction = allocation.removed.sum() / groups.num_units
    assert 0.2 < channel_fraction < 0.4
    assert allocation.achieved == pytest.approx(0.5, abs=0.03)


def test_the_comparison_reuses_the_runs_of_the_sweep_and_the_dp(zoo_cache):
    """The DP's guard measured uniform, global and LAMP at the compile's sparsity with the sweep's meter;
    the report's comparison at that sparsity runs nothing new."""
    from pcc.compiler.calibration import CalibrationData
    from pcc.passes.allocation import AllocateDP
    from pcc.passes.allocation.compare import AllocatorComparison, CompareAllocators
    from pcc.passes.analysis.sensitivity import MeasureSensitivity, VariantMeasurements

    model = zoo_cache.model("mlp")
    calibration = CalibrationData.random(model, samples=16, batch_size=8)
    passes = [
        *preparation_passes(), BuildDependencyGroups(), ScoreImportance(), MeasureSensitivity(calibration=calibration, workers=1),
        AllocateDP(0.5, calibration=calibration, refine_rounds=0),
    ]
    result = Pipeline(passes).run(model)
    meter = result.get(VariantMeasurements).meter
    runs = meter.whole_runs
    assert runs >= 2  # the DP's answer and at least one distinct simple allocation
    CompareAllocators(0.5, calibration=calibration, sparsities=(0.5,))(result.model)
    comparison = result.model.meta[AllocatorComparison.META_KEY]
    assert meter.whole_runs == runs
    assert set(comparison.quality) == {"uniform", "global", "lamp", "dp"}
    assert all(0.0 <= values[0] <= 1.0 for values in comparison.quality.values())  # top-1 agreement with dense
