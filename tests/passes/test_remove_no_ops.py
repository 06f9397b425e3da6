"""RemoveNoOps: Paddle's `scale` op (x·s + 0) in front of Q·Kᵀ hid the query from attention recognition,
so PP-OCRv6's heads were never prunable; with the no-op gone every head is a unit of its own."""

from __future__ import annotations

import io

import numpy as np
import onnx
import torch
from torch import nn

from pcc.compiler.frontend import from_proto
from pcc.compiler.pipeline import Pipeline, analysis_pipeline, preparation_passes
from pcc.passes.analysis import DependencyGroups
from pcc.passes.analysis.attention import AttentionBlocks
from pcc.passes.transforms.remove_no_ops import RemoveNoOps
from tests.conftest import max_relative_difference, run_onnx

HEADS, DIM = 4, 32


class _PaddleStyleBlock(nn.Module):
    """SVTR's attention as paddle2onnx writes it: packed QKV, reshape to [b, n, 3, h, d], and the query
    scaled by `paddle.scale` (a Mul, then an Add of its zero bias)."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.proj = nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, DIM)
        self.register_buffer("bias", torch.zeros(()))  # a tensor, so the exporter keeps the Add

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, HEADS, c // HEADS).permute(2, 0, 3, 1, 4)
        q = q * (c // HEADS) ** -0.5 + self.bias
        attention = (q @ k.transpose(-2, -1)).softmax(-1)
        return x + self.proj((attention @ v).transpose(1, 2).reshape(b, n, c))


def _export() -> onnx.ModelProto:
    torch.manual_seed(0)
    buffer = io.BytesIO()
    torch.onnx.export(nn.Sequential(_PaddleStyleBlock(), _PaddleStyleBlock()).eval(), (torch.randn(1, 10, DIM),),
                      buffer, dynamo=False, input_names=["x"], dynamic_axes={"x": {0: "batch", 1: "tokens"}},
                      opset_version=13)
    return onnx.load_from_string(buffer.getvalue())


def test_a_zero_bias_after_the_query_scale_no_longer_hides_the_heads():
    proto = _export()
    assert sum(n.op_type == "Add" for n in proto.graph.node) >= 2 * 2 + 2  # the zero biases are in the file
    without = [p for p in preparation_passes() if not isinstance(p, RemoveNoOps)]
    hidden = Pipeline([*without, *analysis_pipeline()[len(preparation_passes()):]]).run(from_proto(proto))
    hidden_blocks = hidden.get(AttentionBlocks).blocks
    assert len(hidden_blocks) == 2 and all(block.query is None for block in hidden_blocks)

    result = analysis_pipeline().run(from_proto(proto))
    blocks = result.get(AttentionBlocks).blocks
    assert [(b.heads, b.head_dim) for b in blocks] == [(HEADS, DIM // HEADS)] * 2
    assert all(b.query is not None for b in blocks)
    heads = [g for g in result.get(DependencyGroups).groups if g.kind == "heads"]
    assert [g.num_units for g in heads] == [HEADS, HEADS] and all(g.prunable for g in heads)

    x = np.random.default_rng(0).standard_normal((3, 7, DIM)).astype(np.float32)
    assert max_relative_difference(run_onnx(result.model, {"x": x}), run_onnx(proto, {"x": x})) <= 1e-5
