"""Dynamic cascade head pruning: exact at keep 1, and per input equal to the dense model with the heads it
dropped zeroed in the output projections of the layers that dropped them."""

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
from pcc.passes.transforms import CascadeHeads
from tests.conftest import max_relative_difference, run_onnx


def _encoder():
    torch.manual_seed(0)
    module = zoo.transformer_encoder(layers=4).eval()
    return module, from_torch(module, (torch.randn(2, 7, 32),), dynamic_batch=True, dynamic_sequence=True)


def _cascade(model: ir.Model, **options) -> tuple[onnx.ModelProto, CascadeHeads]:
    pruning = CascadeHeads(**options)
    Pipeline([*preparation_passes(), FindAttentionBlocks(), pruning]).run(model)
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto, full_check=True)
    return proto, pruning


def test_keep_one_reproduces_the_dense_model():
    _, model = _encoder()
    x = np.random.default_rng(0).standard_normal((2, 12, 32), dtype=np.float32)
    feeds = {model.graph.inputs[0].name: x}
    dense = run_onnx(ir.serde.serialize_model(model), feeds)
    proto, pruning = _cascade(model, keep=(1.0, 1.0, 1.0, 1.0), expose_heads=True)
    outputs = run_onnx(proto, feeds)
    assert max_relative_difference(outputs[:1], dense) <= 1e-6 and outputs[1].tolist() == [[0, 1, 2, 3]] * 2


def test_dropped_heads_equal_zeroed_output_projection_columns():
    module, model = _encoder()
    proto, pruning = _cascade(model, keep=(1.0, 1.0, 0.5, 0.5), expose_heads=True)
    assert pruning.report.kept == [4, 4, 2, 2]
    head_dim = 8
    for seed in range(3):  # each input picks its own heads
        x = torch.from_numpy(np.random.default_rng(seed).standard_normal((1, 16, 32), dtype=np.float32))
        hidden, kept = run_onnx(proto, {model.graph.inputs[0].name: x.numpy()})
        masked = zoo.transformer_encoder(layers=4)
        masked.load_state_dict(module.state_dict())
        with torch.no_grad():
            for layer in (2, 3):
                for head in set(range(4)) - set(kept[0].tolist()):
                    masked.layers[layer].self_attn.out_proj.weight[:, head * head_dim : (head + 1) * head_dim] = 0
            expected = masked.eval()(x).numpy()
        assert max_relative_difference([hidden], [expected]) <= 1e-5


def test_schedule_from_sparsity_and_no_attention():
    _, model = _encoder()
    _, pruning = _cascade(model, sparsity=0.25)
    assert pruning.report.kept[0] == 4 and pruning.report.sparsity > 0
    with pytest.raises(InvalidRequestError):
        _cascade(from_torch(zoo.build("resnet_basic")[0], (zoo.build("resnet_basic")[1],)), sparsity=0.3)
