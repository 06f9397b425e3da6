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
