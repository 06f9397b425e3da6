"""The differentiable copy: same outputs as onnxruntime on every zoo model, parameters mapped both ways."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
import torch
import zoo

from pcc.compiler.errors import UnsupportedModelError
from pcc.compiler.pipeline import Pipeline, preparation_passes
from pcc.compiler.torch_module import IRModule
from tests.conftest import max_relative_difference, run_onnx


def _prepared(zoo_cache, name):
    return Pipeline(preparation_passes()).run(zoo_cache.model(name)).model


@pytest.mark.parametrize("name", zoo.TEST_MODELS)
def test_torch_copy_equals_onnxruntime(zoo_cache, name):
    model = _prepared(zoo_cache, name)
    feeds = {model.graph.inputs[0].name: zoo_cache.example_input(name)}
    with torch.no_grad():
        ours = [t.numpy() for t in IRModule(model)(feeds)]
    assert max_relative_difference(ours, run_onnx(model, feeds)) <= 1e-5


def test_every_float_weight_is_a_parameter_named_like_its_initializer(zoo_cache):
    model = _prepared(zoo_cache, "resnet_bottleneck")
    module = IRModule(model)
    names = dict(module.named_weights())
    for name, value in model.graph.initializers.items():
        if name in names:
            np.testing.assert_array_equal(names[name].detach().numpy(), value.const_value.numpy())
    conv_weights = [n.inputs[1].name for n in model.graph if n.op_type == "Conv"]
    assert conv_weights and all(name in names for name in conv_weights)
    bn_statistics = [v.name for n in model.graph if n.op_type == "BatchNormalization" for v in n.inputs[3:5]]
    assert all(name not in names for name in bn_statistics)  # running stats stay fixed


def test_write_back_carries_trained_weights_into_the_onnx_model(zoo_cache):
    model = _prepared(zoo_cache, "mlp")
    module = IRModule(model)
    feeds = {model.graph.inputs[0].name: zoo_cache.example_input("mlp")}
    loss = module(feeds)[0].square().mean()
    loss.backward()
    with torch.no_grad():
        for _, param in module.named_weights():
            param -= 0.1 * param.grad
        expected = [t.numpy() for t in module(feeds)]
    module.write_back(model)
    assert max_relative_difference(run_onnx(model, feeds), expected) <= 1e-5
    assert not np.allclose(run_onnx(_prepared(zoo_cache, "mlp"), feeds)[0], expected[0])


def test_an_op_without_a_torch_rule_is_named():
    x = ir.val("x", ir.DataType.FLOAT, ir.Shape([2]))
    node = ir.node("NonMaxSuppression", [x], name="nms_0")
    node.outputs[0].name = "y"
    graph = ir.Graph([x], node.outputs, nodes=[node], opset_imports={"": 20})
    with pytest.raises(UnsupportedModelError, match="NonMaxSuppression.*nms_0"):
        IRModule(ir.Model(graph, ir_version=10))


@pytest.mark.parametrize("exclusive", [0, 1])
@pytest.mark.parametrize("reverse", [0, 1])
def test_cum_sum_matches_onnxruntime(exclusive, reverse):
    """CumSum (transformers' Llama exports build position ids with it) in every attribute combination."""
    import onnx
    import onnx.helper as helper
    import onnxruntime as ort

    x = np.random.default_rng(0).random((2, 5), dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("CumSum", ["x", "axis"], ["y"], exclusive=exclusive, reverse=reverse)], "cumsum",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 5])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 5])],
        [onnx.numpy_helper.from_array(np.array(-1, np.int64), "axis")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    expected = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    (got,), _ = IRModule(ir.serde.deserialize_model(model)).run({"x": torch.from_numpy(x)})
    np.testing.assert_allclose(got.detach().numpy(), expected, rtol=1e-6, atol=1e-6)
