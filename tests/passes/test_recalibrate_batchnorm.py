"""BatchNorm recalibration: the statistics become those of the data, and they rescue a pruned, trained model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pcc.compiler import from_torch
from pcc.compiler.calibration import CalibrationData
from pcc.compiler.errors import InvalidRequestError
from pcc.compiler.frontend import load_onnx
from pcc.compiler.pipeline import Pipeline, preparation_passes
from pcc.compiler.torch_module import IRModule
from pcc.passes.transforms.recalibrate_batchnorm import RecalibrateBatchNorm, reestimate_batchnorm_statistics
from tests.conftest import ROOT


def _prepared(model):
    Pipeline(preparation_passes()).run(model)
    return model


def _vgg_with_batchnorm():
    """The zoo's VGG exported unoptimised, so its BatchNormalization nodes stay (the default folds them)."""
    import zoo

    module, example = zoo.build("vgg")
    return _prepared(from_torch(module, (example,), optimize=False))


def test_first_batchnorm_gets_the_mean_of_its_inputs_batch_statistics():
    """The first BatchNorm's input does not depend on any other BatchNorm, so its expected statistics
    can be computed independently: the average over batches of each batch's mean and unbiased variance."""
    model = _vgg_with_batchnorm()
    first = next(node for node in model.graph if node.op_type == "BatchNormalization")
    batches = list(CalibrationData.random(model, samples=6, batch_size=2, seed=3))
    with torch.no_grad():
        inputs = [IRModule(model).run(feeds, capture=[first.inputs[0].name])[1][first.inputs[0].name] for feeds in batches]
    expected_mean = torch.stack([x.mean(dim=(0, 2, 3)) for x in inputs]).mean(0).numpy()
    expected_var = torch.stack([x.var(dim=(0, 2, 3), unbiased=True) for x in inputs]).mean(0).numpy()
    before_var = first.inputs[4].const_value.numpy().copy()

    assert reestimate_batchnorm_statistics(model, batches)
    np.testing.assert_allclose(first.inputs[3].const_value.numpy(), expected_mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(first.inputs[4].const_value.numpy(), expected_var, rtol=1e-4, atol=1e-5)
    assert not np.allclose(before_var, expected_var)  # the zoo's statistics were not already these


def test_a_model_without_batchnorm_is_left_alone(zoo_cache):
    model = _prepared(zoo_cache.model("mlp"))
    before = {name: v.const_value.numpy().copy() for name, v in model.graph.initializers.items()}
    assert not reestimate_batchnorm_statistics(model, CalibrationData.random(model, samples=4))
    for name, value in model.graph.initializers.items():
        np.testing.assert_array_equal(value.const_value.numpy(), before[name])


def test_the_pass_refuses_random_inputs():
    model = _vgg_with_batchnorm()
    with pytest.raises(InvalidRequestError, match="real calibration data"):
        Pipeline([RecalibrateBatchNorm(CalibrationData.random(model, samples=4))]).run(model)


def test_recalibration_recovers_accuracy_of_a_pruned_trained_cnn():
    """The committed Fashion-MNIST CNN, half its parameters removed uniformly: re-estimated statistics
    must give back a large part of the accuracy that stale ones lose (measured on held-out test images)."""
    fashion_mnist = pytest.importorskip("fashion_mnist")
    if not fashion_mnist.available():
        pytest.skip("dataset-fashion-mnist is not installed")
    import onnx_ir as ir

    from pcc.backends.onnx.runtime import top1_accuracy
    from pcc.compiler.pipeline import channel_pruning_pipeline

    images, _ = fashion_mnist.calibration_split(256)
    test_images, test_labels = fashion_mnist.load("test", limit=2000)
    accuracy = {}
    for recalibrate in (False, True):
        model = load_onnx(ROOT / "examples" / "models" / "fashion_cnn.onnx")
        calibration = CalibrationData.from_arrays(model, {"image": images}, batch_size=64)
        channel_pruning_pipeline(0.5, calibration=calibration, recalibrate_bn=recalibrate).run(model)
        test = CalibrationData.from_arrays(model, {"image": test_images}, test_labels, batch_size=500)
        accuracy[recalibrate] = top1_accuracy(ir.serde.serialize_model(model).SerializeToString(), test)
    assert accuracy[True] > accuracy[False] + 0.10, accuracy
