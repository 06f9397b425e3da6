"""Fixed-length exports: RelaxSequenceAxis makes the sequence axis symbolic so that cascade token pruning
applies, and the pruned graph equals the algorithm in torch at the export's length and at shorter ones."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
import zoo

from pcc.compiler import from_torch
from pcc.compiler.errors import InvalidRequestError
from pcc.compiler.pipeline import Pipeline, preparation_passes
from pcc.passes.analysis import FindAttentionBlocks
from pcc.passes.analysis.cost import CostReport, MeasureCost
from pcc.passes.analysis.shapes import RelaxedSequence
from pcc.passes.transforms import PruneTokens
from pcc.passes.transforms.relax_sequence_axis import RelaxSequenceAxis
from tests.conftest import max_relative_difference, run_onnx
from tests.passes.test_prune_tokens import _reference

LENGTH = 64


@pytest.fixture(scope="module")
def static_encoder() -> tuple[torch.nn.Module, onnx.ModelProto]:
    """A 4-layer encoder exported at a fixed 64 tokens (no dynamic axes)."""
    torch.manual_seed(0)
    module = zoo.transformer_encoder(layers=4).eval()
    return module, ir.serde.serialize_model(from_torch(module, (torch.randn(1, LENGTH, 32),)))


def _relaxed(proto: onnx.ModelProto, *passes: ir.passes.PassBase) -> tuple[ir.Model, onnx.ModelProto]:
    model = ir.serde.deserialize_model(proto)
    Pipeline([*preparation_passes(), RelaxSequenceAxis(), *passes]).run(model)
    pruned = ir.serde.serialize_model(model)
    onnx.checker.check_model(pruned, full_check=True)
    return model, pruned


def test_token_pruning_on_a_fixed_length_export_equals_the_algorithm_in_torch(static_encoder):
    module, proto = static_encoder
    assert proto.graph.input[0].type.tensor_type.shape.dim[1].dim_value == LENGTH
    keep = (1.0, 0.75, 0.5, 0.25)
    model, pruned = _relaxed(proto, FindAttentionBlocks(required_by="token pruning"), PruneTokens(keep=keep),
                             MeasureCost("after"))
    relaxed = model.meta[RelaxedSequence.META_KEY]
    assert relaxed.length == LENGTH and relaxed.inputs == [proto.graph.input[0].name] and relaxed.rewritten
    name = proto.graph.input[0].name
    for length in (LENGTH, 24):  # the export's length, and a shorter input the fixed-length model never took
        x = torch.randn(1, length, 32, generator=torch.Generator().manual_seed(length))
        (out,) = run_onnx(pruned, {name: x.numpy()})
        with torch.no_grad():
            expected = _reference(module, x, list(keep)).numpy()
        assert out.shape == (1, int(length * 0.25), 32)
        assert max_relative_difference([out], [expected]) <= 1e-5
    # MACs of the relaxed model at the export's length: the last layers run on fewer tokens
    dense_macs = ir.serde.deserialize_model(proto)
    Pipeline([*preparation_passes(), MeasureCost("before")]).run(dense_macs)
    before = dense_macs.meta[CostReport.META_KEY].costs["before"].macs
    after = model.meta[CostReport.META_KEY].costs["after"].macs
    assert 0.4 * before < after < 0.75 * before


def test_a_legacy_fixed_length_export_prunes_the_same(static_encoder, tmp_path):
    """The TorchScript exporter bakes the length into other places (its own reshape targets)."""
    module, _ = static_encoder
    path = tmp_path / "legacy.onnx"
    torch.onnx.export(module, (torch.randn(1, LENGTH, 32),), str(path), dynamo=False, input_names=["x"])
    keep = (1.0, 0.75, 0.5, 0.25)
    _, pruned = _relaxed(onnx.load(str(path)), FindAttentionBlocks(required_by="token pruning"), PruneTokens(keep=keep))
    x = torch.randn(1, 40, 32, generator=torch.Generator().manual_seed(1))
    (out,) = run_onnx(pruned, {"x": x.numpy()})
    with torch.no_grad():
        expected = _reference(module, x, list(keep)).numpy()
    assert out.shape == (1, 10, 32) and max_relative_difference([out], [expected]) <= 1e-5


def test_relaxing_alone_keeps_the_outputs(static_encoder):
    _, proto = static_encoder
    _, relaxed = _relaxed(proto)
    x = torch.randn(1, LENGTH, 32).numpy()
    name = proto.graph.input[0].name
    assert max_relative_difference(run_onnx(relaxed, {name: x}), run_onnx(proto, {name: x})) <= 1e-6
    assert relaxed.graph.input[0].type.tensor_type.shape.dim[1].dim_param == "sequence"


def test_models_without_attention_are_left_alone(tmp_path):
    path = tmp_path / "mlp.onnx"
    torch.onnx.export(torch.nn.Linear(8, 4), (torch.randn(2, 8),), str(path), dynamo=False)
    assert not RelaxSequenceAxis()(ir.load(path)).modified


def test_a_length_it_cannot_relax_is_a_one_line_error(static_encoder):
    """Scores flattened to [.., L * L] and back: no entry of either target is the length itself."""
    _, proto = static_encoder
    model = ir.serde.deserialize_model(proto)
    Pipeline(preparation_passes()).run(model)
    softmax = next(n for n in model.graph if n.op_type == "Softmax")
    scores = softmax.inputs[0]
    value = scores
    for index, target in enumerate(([1, 4, LENGTH * LENGTH], [1, 4, LENGTH, LENGTH])):
        constant = ir.Value(name=f"flat_{index}", const_value=ir.tensor(np.asarray(target, np.int64)))
        model.graph.register_initializer(constant)
        node = ir.node("Reshape", [value, constant], name=f"flat_{index}")
        model.graph.insert_before(softmax, node)
        value = node.outputs[0]
        value.shape, value.dtype = ir.Shape(target), scores.dtype
    softmax.replace_input_with(0, value)
    with pytest.raises(InvalidRequestError, match=f"Softmax node '{softmax.name}'"):
        RelaxSequenceAxis()(model)
