"""Symbolic axes: a legacy-exported ViT (shape arithmetic on the batch), a dynamo export with symbolic
batch and sequence and a legacy BERT whose position table is shorter than the default length are analysed
at sizes they run at, pruned, and keep running at other sizes; a model that runs at no tried size is left
as it is."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
import zoo
from torch import nn

from pcc.compiler import from_torch
from pcc.compiler.errors import InvalidRequestError
from pcc.compiler.frontend import from_proto
from pcc.compiler.pipeline import Pipeline, channel_pruning_pipeline, preparation_passes
from pcc.passes.allocation import Allocation, AllocateUniform
from pcc.passes.analysis import CostReport, DependencyGroups
from pcc.passes.analysis.cost import measure_cost
from pcc.passes.analysis.attention import FindAttentionBlocks
from pcc.passes.analysis.dependency_groups import BuildDependencyGroups
from pcc.passes.analysis.importance import ScoreImportance
from pcc.passes.transforms import MaskChannels, PruneChannels
from pcc.passes.analysis.shapes import representative_shapes
from pcc.passes.transforms.resolve_symbolic_shapes import ResolveSymbolicShapes
from tests.conftest import max_relative_difference, run_onnx


class _Block(nn.Module):
    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 64), nn.Linear(64, dim)

    def forward(self, x):
        b, n, c = x.shape  # timm's attention: the head split is computed from the input's shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attention = (q @ k.transpose(-2, -1) * (c // self.heads) ** -0.5).softmax(-1)
        x = x + self.proj((attention @ v).transpose(1, 2).reshape(b, n, c))
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm2(x))))


class _ViT(nn.Module):
    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, 4)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, 17, dim))
        self.blocks = nn.Sequential(_Block(dim), _Block(dim))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, 10)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        return self.head(self.norm(self.blocks(x))[:, 0])


@pytest.fixture(scope="module")
def legacy_vit(tmp_path_factory) -> onnx.ModelProto:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vit") / "vit.onnx"
    torch.onnx.export(_ViT().eval(), (torch.randn(2, 3, 16, 16),), str(path), dynamo=False, input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    return onnx.load(str(path))


def _images(batch: int) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(batch).standard_normal((batch, 3, 16, 16)).astype(np.float32)}


def test_legacy_vit_gets_groups_and_prunes_at_any_batch(legacy_vit):
    analysis = Pipeline([*preparation_passes(), FindAttentionBlocks(), BuildDependencyGroups(prune=("channels", "heads")), ScoreImportance(),
                         AllocateUniform(0.3)])
    pruned = analysis.run(from_proto(legacy_vit)).model
    groups, allocation = pruned.meta[DependencyGroups.META_KEY], pruned.meta[Allocation.META_KEY]
    prunable = [g for g in groups.groups if g.prunable]
    assert len(prunable) >= 4  # two attention blocks' heads and two FFNs
    assert {g.kind for g in prunable} >= {"heads", "channels"}
    for group in groups.groups:
        if group.cross_channel_norm:
            allocation.removed[group.units] = False
    assert allocation.removed.sum() >= 0.2 * sum(g.num_units for g in prunable)

    masked = from_proto(legacy_vit)
    Pipeline(preparation_passes()).run(masked)
    masked.meta[DependencyGroups.META_KEY], masked.meta[Allocation.META_KEY] = groups, allocation
    Pipeline([MaskChannels()]).run(masked)
    Pipeline([PruneChannels()]).run(pruned)
    proto = ir.serde.serialize_model(pruned)
    onnx.checker.check_model(proto, full_check=True)
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    for batch in (1, 3):
        outputs = run_onnx(proto, _images(batch))
        assert outputs[0].shape == (batch, 10)
        assert max_relative_difference(outputs, run_onnx(masked, _images(batch))) <= 1e-4
        assert max_relative_difference(outputs, run_onnx(legacy_vit, _images(batch))) > 1e-3


@pytest.fixture(scope="module")
def dynamic_encoder() -> onnx.ModelProto:
    torch.manual_seed(0)
    module = zoo.transformer_encoder(layers=2).eval()
    return ir.serde.serialize_model(from_torch(module, (torch.randn(2, 7, 32),), dynamic_batch=True, dynamic_sequence=True))


def test_representative_shapes_give_one_size_per_symbol_and_take_the_users(dynamic_encoder):
    model = ir.serde.deserialize_model(dynamic_encoder)
    name = model.graph.inputs[0].name
    assert representative_shapes(model, batch=1, length=64) == {name: [1, 64, 32]}
    assert representative_shapes(model, input_shapes={name: (3, 20, 32)}) == {name: [3, 20, 32]}


def test_dynamo_export_with_symbolic_batch_and_length_keeps_running_at_other_sizes(dynamic_encoder):
    model = ir.serde.deserialize_model(dynamic_encoder)
    name = model.graph.inputs[0].name
    result = channel_pruning_pipeline(0.3, prune=("channels", "heads")).run(model)
    costs = result.get(CostReport).costs
    assert costs["after"].params < 0.85 * costs["before"].params
    proto = ir.serde.serialize_model(result.model)
    onnx.checker.check_model(proto, full_check=True)
    for batch, length in ((1, 16), (3, 64)):
        x = np.random.default_rng(length).standard_normal((batch, length, 32)).astype(np.float32)
        assert run_onnx(proto, {name: x})[0].shape == (batch, length, 32)


def test_macs_of_a_symbolic_length_encoder_are_counted_at_the_latency_length(dynamic_encoder):
    model = ir.serde.deserialize_model(dynamic_encoder)
    Pipeline(preparation_passes()).run(model)
    dim, hidden, layers = 32, 64, 2
    for length in (128, 16):
        # per layer: Q, K, V and output projections, Q x K^T and P x V, the two FFN matmuls
        expected = layers * (length * (4 * dim * dim + 2 * dim * hidden) + 2 * length * length * dim)
        assert measure_cost(model, batch=1, length=length).macs == expected
    assert measure_cost(model, batch=3, length=16).macs == 3 * measure_cost(model, batch=1, length=16).macs


class _Sequence(nn.Module):
    """A run-time Reshape target over symbolic axes ([batch, width, 12] split to [batch, width, 3, 4])."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 12)

    def forward(self, x):
        y = self.fc(x)
        return y.reshape(y.shape[0], y.shape[1], 3, -1)


def test_an_output_declared_at_the_wrong_rank_is_rebuilt_from_the_constant_target(tmp_path):
    path = tmp_path / "seq.onnx"
    torch.onnx.export(_Sequence().eval(), (torch.randn(1, 5, 8),), str(path), input_names=["x"],
                      dynamic_axes={"x": {0: "batch", 1: "width"}}, dynamo=False)
    proto = onnx.load(str(path))
    output = proto.graph.output[0].type.tensor_type.shape
    del output.dim[:]
    output.dim.add().dim_value = 1  # the exporter's stale `[1, seqlen]`, as ddddocr's common.onnx declares
    output.dim.add().dim_param = "seqlen"
    model = ir.serde.deserialize_model(proto)
    ResolveSymbolicShapes()(model)
    shape = model.graph.outputs[0].shape
    assert len(shape) == 4 and shape[2] == 3
    onnx.checker.check_model(ir.serde.serialize_model(model), full_check=True)  # the clash made this raise
    x = np.random.default_rng(0).standard_normal((2, 7, 8)).astype(np.float32)
    assert run_onnx(ir.serde.serialize_model(model), {"x": x})[0].shape == (2, 7, 3, 4)


def test_a_bert_with_a_short_position_table_is_resolved_at_a_length_it_runs_at(tmp_path):
    """32 positions: at the default 128 tokens the Slice of the position ids clamps to 32 in both copies and its
    Expand target would freeze at 32. The pass halves the length until the model runs at both sizes (16, 32)."""
    from tests.passes.test_attention_exports import _bert_inputs, _legacy, _tiny_bert

    module = _tiny_bert("eager")
    proto = _legacy(module, _bert_inputs(), ["input_ids", "attention_mask"])
    model = from_proto(proto)
    result = channel_pruning_pipeline(0.5, prune=("heads",), round_to=1).run(model)
    slice_ids = next(v for node in result.model.graph for v in node.outputs if v.name == "/bert/embeddings/Slice_output_0")
    assert [d if isinstance(d, int) else d.value for d in slice_ids.shape] == [1, "sequence"]
    costs = result.get(CostReport).costs
    assert costs["after"].params < costs["before"].params
    pruned = ir.serde.serialize_model(result.model)
    onnx.checker.check_model(pruned, full_check=True)
    for batch, length in ((1, 8), (3, 20), (3, 32)):
        ids = np.random.default_rng(length).integers(1, 100, (batch, length))
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        assert run_onnx(pruned, feeds)[0].shape == (batch, length, 32)


class _LongKernel(nn.Module):
    """An STFT-like front end: a 512-sample kernel on a symbolic number of samples."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv1d(1, 16, 512, stride=160), nn.Linear(16, 8)

    def forward(self, x):
        return self.fc(self.conv(x[:, None, :]).transpose(1, 2))


@pytest.fixture
def long_kernel(tmp_path) -> ir.Model:
    path = tmp_path / "long_kernel.onnx"
    torch.onnx.export(_LongKernel().eval(), (torch.randn(1, 1600),), str(path), dynamo=False, input_names=["x"],
                      dynamic_axes={"x": {0: "batch", 1: "samples"}})
    return from_proto(onnx.load(str(path)))


def test_a_model_that_runs_at_no_tried_length_is_left_as_it_is(long_kernel):
    model = long_kernel
    before = ir.serde.serialize_model(model).SerializeToString()
    assert not ResolveSymbolicShapes(length=128)(model).modified  # 128 samples and fewer: no output frames
    assert ir.serde.serialize_model(model).SerializeToString() == before
    resolved = ResolveSymbolicShapes(input_shapes={"x": (1, 1600)})(model)  # the user's size runs
    assert resolved.modified
    frames = next(v for node in model.graph if node.op_type == "Conv" for v in node.outputs)
    assert frames.shape[1] == 16 and not isinstance(frames.shape[2], int)


def test_macs_at_sizes_a_model_cannot_run_at_are_refused_not_negative(long_kernel):
    """openWakeWord's mel front end at 128 samples: the 512-sample kernel gives a negative number of frames."""
    model = long_kernel
    with pytest.raises(InvalidRequestError, match=r"Conv node .* negative size at x=1,128.*--input-shape"):
        measure_cost(model, batch=1, length=128)
    frames = (1600 - 512) // 160 + 1
    assert measure_cost(model, input_shapes={"x": (1, 1600)}).macs == frames * 16 * 512 + frames * 16 * 8
