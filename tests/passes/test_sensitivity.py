"""Sensitivity sweeps: correct curves, the same numbers serial, pooled or on Ray, and a cache that knows its model."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from pcc.compiler.calibration import CalibrationData
from pcc.compiler.pipeline import Pipeline, preparation_passes
from pcc.passes.analysis import BuildDependencyGroups, ScoreImportance
from pcc.passes.analysis.sensitivity import MeasureSensitivity, Sensitivity

FRACTIONS = (0.25, 0.5, 0.75)


def _sweep(model, calibration=None, **options):
    calibration = calibration or CalibrationData.random(model, samples=8, batch_size=8)
    sweep = MeasureSensitivity(calibration=calibration, keep_fractions=FRACTIONS, **options)
    return Pipeline([*preparation_passes(), BuildDependencyGroups(), ScoreImportance(), sweep]).run(model).get(Sensitivity)


def test_curves_start_at_zero_and_grow_when_channels_go(zoo_cache):
    sensitivity = _sweep(zoo_cache.model("vgg"), workers=1)
    assert sensitivity.metric == "kl"  # a classifier's logits
    assert np.array_equal(sensitivity.keep_fractions, [0.25, 0.5, 0.75, 1.0])
    assert (sensitivity.distortion[:, -1] == 0).all()
    assert (sensitivity.distortion[:, 0] > 0).all()
    assert (sensitivity.distortion[:, 0] >= sensitivity.distortion[:, -2]).all()  # removing 75% hurts more than 25%


def test_process_pool_gives_the_serial_numbers(zoo_cache):
    serial = _sweep(zoo_cache.model("resnet_bottleneck"), workers=1)
    pooled = _sweep(zoo_cache.model("resnet_bottleneck"), workers=2)
    assert serial.key == pooled.key
    np.testing.assert_allclose(pooled.distortion, serial.distortion, rtol=1e-5, atol=1e-9)


def test_cache_is_reused_for_the_same_model_and_invalidated_by_a_change(zoo_cache, tmp_path):
    cache = tmp_path / "vgg.pcc-sensitivity.npz"
    first = _sweep(zoo_cache.model("vgg"), workers=1, cache=cache)
    assert not first.reused and cache.exists()
    again = _sweep(zoo_cache.model("vgg"), workers=1, cache=cache)
    assert again.reused and again.key == first.key
    np.testing.assert_array_equal(again.distortion, first.distortion)

    other_data = CalibrationData.random(zoo_cache.model("vgg"), samples=8, batch_size=8, seed=1)
    assert not _sweep(zoo_cache.model("vgg"), other_data, workers=1, cache=cache).reused

    changed = zoo_cache.model("vgg")
    weight = next(v for v in changed.graph.initializers.values() if v.const_value.numpy().ndim == 4)
    weight.const_value = ir.tensor(weight.const_value.numpy() * 1.5, name=weight.name)
    assert not _sweep(changed, workers=1, cache=cache).reused


def test_a_corrupt_cache_is_recomputed(zoo_cache, tmp_path):
    cache = tmp_path / "broken.npz"
    cache.write_bytes(b"not an npz")
    result = _sweep(zoo_cache.model("mlp"), workers=1, cache=cache)
    assert not result.reused and Sensitivity.load(cache) is not None


def test_rate_distortion_plot_is_written(zoo_cache, tmp_path):
    pytest.importorskip("matplotlib")
    path = _sweep(zoo_cache.model("mlp"), workers=1).plot(tmp_path / "rd.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ray_local_mode_on_two_cpus_gives_the_serial_numbers(zoo_cache):
    ray = pytest.importorskip("ray")
    serial = _sweep(zoo_cache.model("mlp"), workers=1)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    try:
        on_ray = _sweep(zoo_cache.model("mlp"), ray_address="local")
    finally:
        ray.shutdown()
    np.testing.assert_allclose(on_ray.distortion, serial.distortion, rtol=1e-5, atol=1e-9)


def test_conditional_curves_are_measured_from_the_operating_point(zoo_cache):
    """Around an allocation, each group's curve is 0 at its allocated width and the other groups stay there."""
    from pcc.passes.allocation import AllocateUniform, Allocation
    from pcc.passes.analysis import DependencyGroups, Importance
    from pcc.passes.analysis.sensitivity import measure_sensitivity

    model = zoo_cache.model("vgg")
    calibration = CalibrationData.random(model, samples=8, batch_size=8)
    result = Pipeline([*preparation_passes(), BuildDependencyGroups(), ScoreImportance(), AllocateUniform(0.5)]).run(model)
    groups, around = result.get(DependencyGroups), result.get(Allocation).keep_units
    conditional = measure_sensitivity(
        model, groups, result.get(Importance).scores, calibration, FRACTIONS, "kl", workers=1, around=around
    )
    plain = measure_sensitivity(model, groups, result.get(Importance).scores, calibration, FRACTIONS, "kl", workers=1)
    assert conditional.key != plain.key
    for row, group in enumerate(conditional.groups):
        at = np.flatnonzero(conditional.keep_units[row] == around[group])
        assert at.size and np.all(conditional.distortion[row, at] == 0)
        narrowest = conditional.keep_units[row, 0] < around[group]
        assert not narrowest or conditional.distortion[row, 0] != 0  # narrowing further changes the outputs
    assert not np.allclose(conditional.distortion[:, 0], plain.distortion[:, 0])  # the context matters


def _analysed(model):
    from pcc.passes.analysis import DependencyGroups, Importance

    result = Pipeline([*preparation_passes(), BuildDependencyGroups(), ScoreImportance()]).run(model)
    return result.model, result.get(DependencyGroups), result.get(Importance).scores


def test_a_variant_run_on_its_region_measures_what_the_whole_model_does(zoo_cache):
    """Residual sums, concatenations, splits: the sub-model downstream of a group, fed the dense activations
    entering it, gives the whole pruned model's distortion, and later groups run on smaller regions."""
    from pcc.passes.allocation.allocation import RemovalPlanner
    from pcc.passes.analysis.sensitivity import VariantMeter

    model, groups, scores = _analysed(zoo_cache.model("yolo_neck"))  # residual C2f blocks, splits, upsampled concats
    planner = RemovalPlanner(groups, scores)
    meter = VariantMeter.dense(model, groups, CalibrationData.random(model, samples=8, batch_size=4))
    full = np.asarray([g.num_units for g in groups.groups])
    for group in [g for g in groups.groups if g.prunable][::3]:
        keep = full.copy()
        keep[group.index] = max(group.min_units, group.num_units // 2)
        removed = planner.mask(keep)
        on_region, samples = meter.region(group.index, removed)
        assert samples == 8
        assert on_region == pytest.approx(meter.joint(removed).distortion, rel=1e-4, abs=1e-9)
    sizes = [len(meter.regions[g.index].nodes) for g in groups.groups if g.prunable]
    assert max(sizes) <= len(list(model.graph)) and min(sizes) < len(list(model.graph)) / 2


def test_sampling_stops_when_the_estimate_is_tight_and_uses_everything_when_asked(zoo_cache):
    from pcc.passes.analysis.sensitivity import FULL_SET, Sampling, measure_sensitivity

    model, groups, scores = _analysed(zoo_cache.model("vgg"))
    calibration = CalibrationData.random(model, samples=64, batch_size=8)
    loose = measure_sensitivity(model, groups, scores, calibration, (0.5,), "kl", workers=1, sampling=Sampling(10.0, 16))
    full = measure_sensitivity(model, groups, scores, calibration, (0.5,), "kl", workers=1, sampling=FULL_SET)
    assert (loose.samples[:, 0] == 16).all()  # the floor: a tenfold standard error is always tight enough
    assert (full.samples[:, 0] == 64).all() and (full.samples[:, -1] == 0).all()  # full width: not run
    assert loose.key != full.key
    # the first 16 samples estimate the full-set distortion within a few standard errors
    np.testing.assert_allclose(loose.distortion[:, 0], full.distortion[:, 0], rtol=0.5)


def test_a_tight_sampling_rule_adds_batches_until_the_standard_error_is_small():
    from pcc.passes.analysis.sensitivity import Sampling, _Estimate

    rng = np.random.default_rng(0)
    rule, estimate, batches = Sampling(relative_error=0.1, min_samples=8, absolute_error=0.0), _Estimate(), 0
    while not rule.settled(estimate):
        reference = rng.normal(size=(8, 10))
        estimate.add([reference], [reference + rng.normal(scale=0.5, size=(8, 10))], "kl")
        batches += 1
    kl = np.concatenate(estimate.num)
    assert estimate.value == pytest.approx(kl.mean())
    assert estimate.stderr == pytest.approx(kl.std(ddof=1) / np.sqrt(len(kl)))
    assert estimate.stderr <= 0.1 * estimate.value and batches > 1


def test_the_sweep_repairs_each_variant_as_the_final_model_is_repaired(zoo_cache):
    """Reconstruction of the group's consumers on its region gives what reconstructing the whole
    pruned model gives, and it lowers the distortion the sweep sees."""
    pytest.importorskip("pcc.passes.transforms.reconstruct")
    from pcc.passes.allocation.allocation import RemovalPlanner
    from pcc.passes.analysis.sensitivity import Repair, VariantMeter

    model, groups, scores = _analysed(zoo_cache.model("resnet_bottleneck"))
    planner = RemovalPlanner(groups, scores)
    calibration = CalibrationData.random(model, samples=16, batch_size=8)
    plain = VariantMeter.dense(model, groups, calibration)
    repaired = VariantMeter.dense(model, groups, calibration, repair=Repair(reconstruct="ls"))
    full = np.asarray([g.num_units for g in groups.groups])
    lowered = 0
    for group in [g for g in groups.groups if g.prunable][-3:]:
        keep = full.copy()
        keep[group.index] = max(group.min_units, group.num_units // 2)
        removed = planner.mask(keep)
        on_region, _ = repaired.region(group.index, removed)
        assert on_region == pytest.approx(repaired.joint(removed).distortion, rel=1e-3, abs=1e-9)
        lowered += on_region < plain.region(group.index, removed)[0]
    assert lowered >= 2


def test_around_a_pruned_base_a_variant_refits_only_its_groups_layers_and_tracks_the_whole_repair(zoo_cache):
    """Around an allocation, a variant runs on its group's region with the base's reconstructed weights, and
    re-fits only the layers whose shapes differ from the base's against the dense activations: close to
    reconstructing the whole variant, far from not reconstructing at all."""
    from pcc.passes.allocation.allocation import RemovalPlanner
    from pcc.passes.analysis.sensitivity import FULL_SET, Repair, VariantMeter

    model, groups, scores = _analysed(zoo_cache.model("resnet_bottleneck"))
    planner = RemovalPlanner(groups, scores)
    dense = VariantMeter.dense(model, groups, CalibrationData.random(model, samples=16, batch_size=8))
    prunable = [g for g in groups.groups if g.prunable]
    base = np.asarray([g.num_units for g in groups.groups])
    for group in prunable[:-2] + prunable[-1:]:  # one group stays whole: its consumers were not re-fitted
        base[group.index] = max(group.min_units, 3 * group.num_units // 4)

    def meter(repair):
        return VariantMeter(model, groups, dense.batches, dense.reference, dense.metric, repair, FULL_SET, planner.mask(base))

    refitted, unrepaired = meter(Repair(reconstruct="ls")), meter(Repair())
    nodes = len(list(model.graph))
    for group in prunable[-3:]:
        keep = base.copy()
        keep[group.index] = max(group.min_units, group.num_units // 4)
        removed = planner.mask(keep)
        on_region, _ = refitted.region(group.index, removed)
        whole = refitted.joint(removed).distortion
        assert len(refitted.regions[group.index].nodes) < nodes / 2
        assert on_region == pytest.approx(whole, rel=0.25)
        assert on_region < 0.5 * unrepaired.region(group.index, removed)[0]
