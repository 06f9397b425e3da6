"""The DP allocator: exact against brute force, meets the budget, reports its additivity check."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from pcc.compiler.calibration import CalibrationData
from pcc.compiler.pipeline import Pipeline, preparation_passes
from pcc.passes.allocation import AllocateDP, AllocateUniform, Allocation, solve_rate_distortion
from pcc.passes.analysis import BuildDependencyGroups, DependencyGroups, ScoreImportance
from pcc.passes.analysis.sensitivity import MeasureSensitivity, Sensitivity


def _brute_force(distortion, saving, required, limit=None):
    best, picks = np.inf, None
    for choice in itertools.product(*(range(distortion.shape[1]) for _ in range(distortion.shape[0]))):
        rows = np.arange(len(choice))
        total = saving[rows, choice].sum()
        in_range = total >= required and (limit is None or total <= limit)
        if in_range and distortion[rows, choice].sum() < best:
            best, picks = distortion[rows, choice].sum(), choice
    return best, picks


@pytest.mark.parametrize("trial", range(40))
def test_dp_is_exact_against_brute_force(trial):
    rng = np.random.default_rng(trial)
    groups, options = rng.integers(1, 5), rng.integers(1, 5)
    distortion = rng.random((groups, options)) - 0.3  # conditional curves can be negative
    distortion[rng.random((groups, options)) < 0.15] = np.inf  # padding options
    saving = rng.integers(0, 12, size=(groups, options))
    required = int(rng.integers(0, saving.max(axis=1).sum() + 3))
    limit = None if trial % 2 else required + int(rng.integers(0, 6))
    expected, _ = _brute_force(distortion, saving, required, limit)
    picks, total = solve_rate_distortion(distortion, saving, required, limit)
    if not np.isfinite(expected):
        assert not np.isfinite(total)
        return
    assert total == pytest.approx(expected)
    rows = np.arange(groups)
    assert distortion[rows, picks].sum() == pytest.approx(total)  # the backtracked choice is the optimum
    assert saving[rows, picks].sum() >= required
    assert limit is None or saving[rows, picks].sum() <= limit


def test_an_upper_limit_stops_a_free_lunch_from_overshooting_the_budget():
    """Measured curves are not always monotone: if pruning a group further measures lower, the plain
    minimum takes it and removes far more than asked; the limit keeps the saving in the band."""
    distortion = np.array([[1.0, 0.5, 0.2], [0.0, 0.3, 0.6]])
    saving = np.array([[0, 2, 10], [0, 2, 4]])
    picks, _ = solve_rate_distortion(distortion, saving, 2)
    assert saving[[0, 1], picks].sum() == 10  # the "free" deep cut
    picks, _ = solve_rate_distortion(distortion, saving, 2, limit=3)
    assert saving[[0, 1], picks].sum() == 2


def test_dp_rejects_negative_savings():
    with pytest.raises(ValueError):
        solve_rate_distortion(np.zeros((1, 2)), np.array([[0, -1]]), 1)


def _dp(model, sparsity, budget="params", refine_rounds=1, **dp_options):
    calibration = CalibrationData.random(model, samples=16, batch_size=16)
    passes = [
        *preparation_passes(),
        BuildDependencyGroups(),
        ScoreImportance(),
        MeasureSensitivity(calibration=calibration, workers=1),
        AllocateDP(sparsity=sparsity, budget=budget, calibration=calibration, refine_rounds=refine_rounds, workers=1, **dp_options),
    ]
    result = Pipeline(passes).run(model)
    return result.get(DependencyGroups), result.get(Allocation)


@pytest.mark.parametrize("budget", ["params", "macs"])
@pytest.mark.parametrize("sparsity", [0.3, 0.6])
def test_dp_meets_the_budget(zoo_cache, budget, sparsity):
    groups, allocation = _dp(zoo_cache.model("resnet_bottleneck"), sparsity, budget)
    assert allocation.method == "AllocateDP" and allocation.budget == budget
    assert abs(allocation.achieved - sparsity) <= 0.02 or allocation.achieved >= allocation.reachable - 1e-9
    assert all(allocation.keep_units[g.index] >= 1 for g in groups.groups)


def test_dp_reports_the_additivity_check_and_spends_where_it_hurts_least(zoo_cache):
    groups, allocation = _dp(zoo_cache.model("vgg"), 0.5)
    assert allocation.predicted_distortion is not None and allocation.predicted_distortion > 0
    assert allocation.measured_distortion is not None and allocation.measured_distortion > 0
    assert "additivity check" in allocation.summary()
    fractions = [allocation.keep_units[g.index] / g.num_units for g in groups.groups if g.prunable]
    assert max(fractions) - min(fractions) > 0.1  # not uniform


def test_dp_at_zero_sparsity_keeps_everything(zoo_cache):
    _, allocation = _dp(zoo_cache.model("mlp"), 0.0)
    assert not allocation.removed.any()


def test_dp_predicts_less_distortion_than_uniform_at_the_same_budget(zoo_cache):
    """The DP's objective is the summed curve distortion: at its optimum, no allocation (uniform included) does better."""
    model = zoo_cache.model("vgg")
    groups, dp = _dp(model, 0.5)
    calibration = CalibrationData.random(zoo_cache.model("vgg"), samples=16, batch_size=16)
    result = Pipeline(
        [*preparation_passes(), BuildDependencyGroups(), ScoreImportance(),
         MeasureSensitivity(calibration=calibration, workers=1), AllocateUniform(0.5)]
    ).run(zoo_cache.model("vgg"))
    uniform = result.get(Allocation)
    summed = result.get(Sensitivity).summed_distortion(uniform.keep_units)
    assert uniform.achieved <= dp.achieved + 0.02
    assert dp.predicted_distortion <= summed + 1e-9


def test_refinement_is_never_worse_than_the_additive_answer_by_measurement(zoo_cache):
    """Refinement re-solves on curves measured around the current answer and keeps the lowest joint
    distortion it measured; the plain additive answer is one of the candidates."""
    _, additive = _dp(zoo_cache.model("vgg"), 0.6, refine_rounds=0)
    _, refined = _dp(zoo_cache.model("vgg"), 0.6, refine_rounds=2)
    assert refined.measured_distortion <= additive.measured_distortion + 1e-12
    assert refined.predicted_distortion is not None
    assert abs(refined.achieved - 0.6) <= 0.02


def test_refinement_is_skipped_and_said_where_a_round_would_remeasure_too_many_variants(zoo_cache, monkeypatch):
    """A round costs a whole sweep: above the variant limit the DP answers from the first sweep alone."""
    import pcc.passes.allocation.rate_distortion as rate_distortion

    def no_sweep(*args, **kwargs):
        raise AssertionError("a refinement sweep ran")

    monkeypatch.setattr(rate_distortion, "measure_sensitivity", no_sweep)
    _, allocation = _dp(zoo_cache.model("vgg"), 0.6, refine_rounds=2, refine_variant_limit=1)
    assert allocation.refinement is not None and "refinement skipped" in allocation.refinement
    assert "refinement skipped" in allocation.summary()


def test_the_guard_keeps_a_simple_allocators_answer_when_the_curves_mislead(zoo_cache):
    """Fed curves that rank the groups backwards, the DP's own answer measures worse than what uniform,
    global or LAMP do at the same budget; the guard measures all four and keeps the best."""
    import dataclasses

    from pcc.passes.results import store

    model = zoo_cache.model("vgg")
    calibration = CalibrationData.random(model, samples=16, batch_size=16)
    result = Pipeline(
        [*preparation_passes(), BuildDependencyGroups(), ScoreImportance(), MeasureSensitivity(calibration=calibration, workers=1)]
    ).run(model)
    sensitivity = result.get(Sensitivity)
    store(result.model, dataclasses.replace(sensitivity, distortion=-sensitivity.distortion))
    misled = AllocateDP(0.5, calibration=calibration, refine_rounds=0, guard=False)
    misled(result.model)
    own = result.model.meta[Allocation.META_KEY]
    assert own.kept_from is None and set(own.candidates) == {"dp"}
    AllocateDP(0.5, calibration=calibration, refine_rounds=0)(result.model)
    guarded = result.model.meta[Allocation.META_KEY]
    assert set(guarded.candidates) == {"dp", "uniform", "global", "lamp"}
    assert guarded.candidates["dp"] == pytest.approx(own.measured_distortion)
    assert guarded.measured_distortion == pytest.approx(min(guarded.candidates.values()))
    assert guarded.kept_from in ("uniform", "global", "lamp") and guarded.method == "AllocateDP"
    assert f"dp: kept {guarded.kept_from}'s allocation" in guarded.summary()
    assert abs(guarded.achieved - 0.5) <= 0.02


def test_the_guard_measures_with_the_final_models_repair_when_given_one(zoo_cache):
    """The sweep's variants may get a cheaper repair than the final model; the guard's four whole-model
    comparisons get `guard_repair` (least-squares reconstruction here), so the allocation it keeps is the
    one that measures best as it will be compiled."""
    from pcc.passes.analysis.sensitivity import Repair, VariantMeter

    model = zoo_cache.model("vgg")
    calibration = CalibrationData.random(model, samples=16, batch_size=16)
    result = Pipeline(
        [*preparation_passes(), BuildDependencyGroups(), ScoreImportance(), MeasureSensitivity(calibration=calibration, workers=1)]
    ).run(model)
    AllocateDP(0.5, calibration=calibration, refine_rounds=0)(result.model)
    plain = result.model.meta[Allocation.META_KEY]
    AllocateDP(0.5, calibration=calibration, refine_rounds=0, guard_repair=Repair(reconstruct="ls"))(result.model)
    repaired = result.model.meta[Allocation.META_KEY]
    assert set(repaired.candidates) == {"dp", "uniform", "global", "lamp"}
    assert repaired.measured_distortion == pytest.approx(min(repaired.candidates.values()))
    groups = result.get(DependencyGroups)
    meter = VariantMeter.dense(result.model, groups, calibration, result.get(Sensitivity).metric, Repair(reconstruct="ls"))
    assert meter.joint(repaired.removed).distortion == pytest.approx(repaired.measured_distortion, rel=1e-4)
    # reconstruction repairs every candidate: each measures less than without it
    for name, value in repaired.candidates.items():
        assert value < plain.candidates[name], name
