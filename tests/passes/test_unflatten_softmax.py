"""Files older than opset 13 (paddle2onnx writes 11 and 12): onnx's version converter wraps every Softmax in
Flatten → Softmax → Reshape, which hid PP-OCRv4's attention; UnflattenSoftmax restores the last-axis softmax.
And a model that adds a skip from before its attention blocks to their output (PP-OCR's recognisers) cannot
have tokens pruned: `--target spatten` then prunes heads only and says which node kept the tokens."""

from __future__ import annotations

import io
import json

import numpy as np
import onnx
import torch
from torch import nn

from pcc.compiler.frontend import from_proto
from pcc.compiler.pipeline import Pipeline, analysis_pipeline, preparation_passes
from pcc.passes.analysis import DependencyGroups
from pcc.passes.analysis.attention import AttentionBlocks
from pcc.passes.transforms.unflatten_softmax import UnflattenSoftmax
from tests.compiler.test_cli import pcc
from tests.conftest import max_relative_difference, run_onnx
from tests.passes.test_remove_no_ops import DIM, HEADS, _PaddleStyleBlock


class _SkipAroundBlocks(nn.Module):
    """Attention blocks whose output is added to the input they started from (a skip around all of them)."""

    def __init__(self, layers: int) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*(_PaddleStyleBlock() for _ in range(layers)))

    def forward(self, x):
        return self.blocks(x) + x


def _export_opset12(module: nn.Module) -> onnx.ModelProto:
    torch.manual_seed(0)
    buffer = io.BytesIO()
    torch.onnx.export(module.eval(), (torch.randn(1, 10, DIM),), buffer, dynamo=False, input_names=["x"],
                      dynamic_axes={"x": {0: "batch", 1: "tokens"}}, opset_version=12)
    return onnx.load_from_string(buffer.getvalue())


def test_an_opset12_softmax_no_longer_hides_the_attention_blocks():
    proto = _export_opset12(nn.Sequential(_PaddleStyleBlock(), _PaddleStyleBlock()))
    assert {entry.version for entry in proto.opset_import if entry.domain in ("", "ai.onnx")} == {12}
    without = [p for p in preparation_passes() if not isinstance(p, UnflattenSoftmax)]
    hidden = Pipeline([*without, *analysis_pipeline()[len(preparation_passes()):]]).run(from_proto(proto))
    assert len(hidden.get(AttentionBlocks)) == 0  # the converter's Flatten sits between Q·Kᵀ and the softmax

    result = analysis_pipeline().run(from_proto(proto))
    blocks = result.get(AttentionBlocks).blocks
    assert [(b.heads, b.kv_heads, b.head_dim) for b in blocks] == [(HEADS, HEADS, DIM // HEADS)] * 2
    assert sum(n.op_type == "Flatten" for n in result.model.graph) == 0
    heads = [g for g in result.get(DependencyGroups).groups if g.kind == "heads"]
    assert [g.num_units for g in heads] == [HEADS, HEADS] and all(g.prunable for g in heads)
    x = np.random.default_rng(0).standard_normal((3, 7, DIM)).astype(np.float32)
    assert max_relative_difference(run_onnx(result.model, {"x": x}), run_onnx(proto, {"x": x})) <= 1e-5


def test_spatten_prunes_heads_only_where_a_skip_keeps_every_token(tmp_path):
    model, out = tmp_path / "skip.onnx", tmp_path / "skip.spatten"
    onnx.save(_export_opset12(_SkipAroundBlocks(layers=3)), model)
    done = pcc("compile", model, "--sparsity", "0.3", "--target", "spatten", "-o", out, "--latency-length", "16")
    assert done.returncode == 0, done.stderr
    assert "heads only, tokens kept: node '" in done.stdout and "fails in onnxruntime once tokens are removed" in done.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["token_keep"] == [1.0] * 3
    assert report["head_kept"][0] == HEADS and sum(report["head_kept"]) < 3 * HEADS
    onnx.checker.check_model(str(out / "model.onnx"), full_check=True)
    for batch, length in ((1, 16), (3, 8)):
        x = np.random.default_rng(batch).standard_normal((batch, length, DIM)).astype(np.float32)
        assert run_onnx(out / "model.onnx", {"x": x})[0].shape == (batch, length, DIM)
