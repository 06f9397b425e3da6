"""Importance criteria: group magnitude over every coupled weight, BN scale with fallback, random."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import zoo

from pcc.compiler.frontend import from_torch, load_onnx
from pcc.compiler.pipeline import analysis_pipeline
from pcc.passes.analysis import DependencyGroups
from pcc.passes.analysis.importance import score_units


def _groups(model):
    return analysis_pipeline().run(model).get(DependencyGroups)


def test_l1_and_l2_sum_every_weight_slice_of_a_unit(zoo_cache):
    model = zoo_cache.model("mlp")
    groups = _groups(model)
    group = groups.groups[0]
    w_out = model.graph.initializers[group.producers[0]].const_value.numpy()  # Gemm weight [out, in]
    w_in = model.graph.initializers[group.consumers[0]].const_value.numpy()
    expected_l1 = (np.abs(w_out).sum(axis=1) + np.abs(w_in).sum(axis=0)) / 2
    expected_l2 = ((w_out**2).sum(axis=1) + (w_in**2).sum(axis=0)) / 2
    np.testing.assert_allclose(score_units(model, groups, "l1").scores[group.units], expected_l1, rtol=1e-6)
    np.testing.assert_allclose(score_units(model, groups, "l2").scores[group.units], expected_l2, rtol=1e-6)
    summed = score_units(model, groups, "l1", "sum").scores[group.units]
    np.testing.assert_allclose(summed, 2 * expected_l1, rtol=1e-6)
    peak = score_units(model, groups, "l1", "max").scores[group.units]
    np.testing.assert_allclose(peak, np.maximum(np.abs(w_out).sum(axis=1), np.abs(w_in).sum(axis=0)), rtol=1e-6)


def test_bn_scores_gamma_and_falls_back_where_bn_was_folded():
    module, example = zoo.build("resnet_basic")
    kept_bn = from_torch(module, (example,), optimize=False)
    groups = _groups(kept_bn)
    importance = score_units(kept_bn, groups, "bn")
    assert importance.fallback_groups == []
    group = next(g for g in groups.groups if "stages.0.body.0.0.weight" in g.producers)
    gamma = np.abs(kept_bn.graph.initializers["stages.0.body.0.1.weight"].const_value.numpy())
    np.testing.assert_allclose(importance.scores[group.units], gamma, rtol=1e-6)

    folded = from_torch(module, (example,))
    groups = _groups(folded)
    importance = score_units(folded, groups, "bn")
    assert sorted(importance.fallback_groups) == [g.index for g in groups.groups]
    np.testing.assert_allclose(importance.scores, score_units(folded, groups, "l2").scores)


def test_random_is_seeded(zoo_cache):
    model = zoo_cache.model("vgg")
    groups = _groups(model)
    a, b, c = (score_units(model, groups, "random", seed=s).scores for s in (1, 1, 2))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_unknown_criterion_is_rejected(zoo_cache):
    model = zoo_cache.model("mlp")
    with pytest.raises(ValueError, match="snip"):
        score_units(model, _groups(model), "snip")


def test_model_zoo_batchnorm_graph_scores_by_gamma():
    model = load_onnx(onnx.__path__[0] + "/backend/test/data/light/light_resnet50.onnx")
    groups = _groups(model)
    assert score_units(model, groups, "bn").fallback_groups == []


def _mlp_reference():
    """The zoo MLP, its IR, the first hidden group, and torch's own gradients at calibration data."""
    import torch
    import torch.nn.functional as F

    from pcc.compiler.calibration import CalibrationData

    module, example = zoo.build("mlp")
    model = from_torch(module, (example,))
    groups = _groups(model)
    group = next(g for g in groups.groups if "net.0.weight" in g.producers)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 32)).astype(np.float32)
    calibration = CalibrationData.from_arrays(model, {"x": x}, batch_size=4)
    module.zero_grad()
    grads_sq = {n: torch.zeros_like(p) for n, p in module.named_parameters()}
    grads = {n: torch.zeros_like(p) for n, p in module.named_parameters()}
    for start in (0, 4):
        module.zero_grad()
        logits = module(torch.from_numpy(x[start : start + 4]))
        F.cross_entropy(logits, logits.detach().argmax(1)).backward()
        for n, p in module.named_parameters():
            grads[n] += p.grad
            grads_sq[n] += p.grad**2
    return module, model, groups, group, calibration, x, grads, grads_sq


def test_taylor_and_hessian_match_torch_autograd_of_the_source_module():
    module, model, groups, group, calibration, _, grads, grads_sq = _mlp_reference()
    w_out, w_in = module.net[0].weight.detach().numpy(), module.net[2].weight.detach().numpy()
    g_out, g_in = grads["net.0.weight"].numpy(), grads["net.2.weight"].numpy()
    taylor = (np.abs(w_out * g_out).sum(1) + np.abs(w_in * g_in).sum(0)) / 2
    got = score_units(model, groups, "taylor", calibration=calibration).scores[group.units]
    np.testing.assert_allclose(got, taylor, rtol=1e-4)
    s_out, s_in = grads_sq["net.0.weight"].numpy(), grads_sq["net.2.weight"].numpy()
    hessian = (0.5 * (w_out**2 * s_out).sum(1) + 0.5 * (w_in**2 * s_in).sum(0)) / 2
    got = score_units(model, groups, "hessian", calibration=calibration).scores[group.units]
    np.testing.assert_allclose(got, hessian, rtol=1e-4)


def test_activation_is_mean_absolute_output_of_the_producing_layer():
    import torch

    module, model, groups, group, calibration, x, _, _ = _mlp_reference()
    with torch.no_grad():
        hidden = module.net[0](torch.from_numpy(x)).abs().mean(0).numpy()
    importance = score_units(model, groups, "activation", calibration=calibration)
    np.testing.assert_allclose(importance.scores[group.units], hidden, rtol=1e-5)
    assert importance.synthetic_data is False


def test_data_criteria_without_calibration_run_on_random_inputs_and_say_so(zoo_cache):
    model = zoo_cache.model("vgg")
    importance = score_units(model, _groups(model), "taylor")
    assert importance.synthetic_data and np.all(importance.scores >= 0) and importance.scores.max() > 0


def test_lamp_is_comparable_across_groups_and_keeps_order(zoo_cache):
    model = zoo_cache.model("resnet_bottleneck")
    groups = _groups(model)
    l2 = score_units(model, groups, "l2").scores
    lamp = score_units(model, groups, "lamp").scores
    for group in groups.groups:
        own, mine = l2[group.units], lamp[group.units]
        assert mine.max() == pytest.approx(1.0)  # the largest unit's tail is itself
        assert np.array_equal(np.argsort(own, kind="stable"), np.argsort(mine, kind="stable"))
        smallest = np.argmin(own)
        assert mine[smallest] == pytest.approx(own[smallest] / own.sum())
