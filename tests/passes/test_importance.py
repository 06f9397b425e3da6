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
    with pytest.raises(ValueError, match="taylor"):
        score_units(model, _groups(model), "taylor")


def test_model_zoo_batchnorm_graph_scores_by_gamma():
    model = load_onnx(onnx.__path__[0] + "/backend/test/data/light/light_resnet50.onnx")
    groups = _groups(model)
    assert score_units(model, groups, "bn").fallback_groups == []
