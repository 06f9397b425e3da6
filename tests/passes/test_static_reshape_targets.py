"""Dynamic-batch exports: the computed flatten target becomes static, so the last conv stays prunable."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import zoo
from onnx import TensorProto, helper

from pcc.compiler import from_torch
from pcc.compiler.pipeline import Pipeline, analysis_pipeline, channel_pruning_pipeline, preparation_passes
from pcc.passes.analysis import DependencyGroups
from pcc.passes.transforms import StaticReshapeTargets
from tests.conftest import run_onnx


def _dynamic_vgg() -> ir.Model:
    module, example = zoo.build("vgg")
    return from_torch(module, (example.repeat(2, 1, 1, 1),), dynamic_batch=True, optimize=False)  # keeps the computed target


def test_batch_size_reshape_gets_a_static_target_and_keeps_any_batch():
    model = _dynamic_vgg()
    assert any(n.op_type == "Reshape" and n.inputs[1].const_value is None for n in model.graph)
    feeds = {model.graph.inputs[0].name: np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)}
    expected = run_onnx(model, feeds)
    Pipeline(preparation_passes()).run(model)
    reshapes = [n for n in model.graph if n.op_type == "Reshape"]
    assert reshapes and all(n.inputs[1].const_value is not None for n in reshapes)
    assert reshapes[-1].inputs[1].const_value.numpy()[0] == 0  # "copy the batch size"
    np.testing.assert_allclose(run_onnx(model, feeds)[0], expected[0], rtol=1e-5, atol=1e-6)


def test_every_conv_group_is_prunable_and_the_pruned_model_takes_any_batch():
    groups = analysis_pipeline().run(_dynamic_vgg()).get(DependencyGroups)
    assert all(g.prunable for g in groups.groups) and not groups.barriers
    result = channel_pruning_pipeline(0.5).run(_dynamic_vgg())
    for batch in (1, 5):
        x = np.zeros((batch, 3, 32, 32), np.float32)
        assert run_onnx(result.model, {result.model.graph.inputs[0].name: x})[0].shape[0] == batch


def test_targets_it_cannot_prove_are_left_alone():
    """A target from another tensor's batch (a different symbolic size) is not rewritten."""
    nodes = [
        helper.make_node("Shape", ["y"], ["y_batch"], end=1),
        helper.make_node("Concat", ["y_batch", "minus_one"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["z"]),
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4]), helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", 3])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
        [helper.make_tensor("minus_one", TensorProto.INT64, [1], [-1])],
    )
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]))
    assert not StaticReshapeTargets()(model).modified
