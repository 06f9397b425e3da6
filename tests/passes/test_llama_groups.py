"""Llama decoders (GQA, SwiGLU, RMSNorm, RoPE) as transformers writes them, exported by torch's dynamo exporter.

Per decoder layer pcc finds one attention block through the rotary embedding (Q, K, V, O projections,
2 key/value heads for 4 query heads), one heads group whose unit is a key/value head with its query heads,
and one SwiGLU group (gate and up rows with the down column); the residual width is never a group. Removing
units gives a model that runs in onnxruntime and equals the torch model with those units' output-projection
inputs zeroed; removing a decoder layer equals the torch model without it.

Why these units: the grouped-query repeat (Expand/Reshape of each key/value head to its query heads) gives
every key/value head the same number of query heads, so a query head alone cannot go unless every group
loses one; a key/value head with its query heads is the finest unit that removes K/V work and cache too.
RoPE pairs channel i with i + d/2 inside a head, so the head dim is never cut: heads go whole. RMSNorm's
mean of squares runs over the hidden axis (a reduction: the channel rules freeze it), so the residual
width stays as it is and every layer's input and output keep the model's hidden size.
"""

from __future__ import annotations

import copy

import numpy as np
import onnx_ir as ir
import pytest

from tests.conftest import max_relative_difference, run_onnx
from tests.passes.tiny_llama import CONFIG, exported, tiny_llama, token_batches, torch_logits

from pcc.compiler import Pipeline
from pcc.compiler.calibration import CalibrationData
from pcc.compiler.pipeline import analysis_pipeline, channel_pruning_pipeline, preparation_passes
from pcc.passes.allocation import Allocation
from pcc.passes.analysis import DependencyGroups
from pcc.passes.analysis.attention import AttentionBlocks
from pcc.passes.analysis.residual_blocks import FindResidualBlocks, ResidualBlocks
from pcc.passes.transforms import PruneBlocks
from pcc.passes.transforms.prune_blocks import BlockPruneReport

LAYERS, HEADS, KV_HEADS = CONFIG["num_hidden_layers"], CONFIG["num_attention_heads"], CONFIG["num_key_value_heads"]
HEAD_DIM = CONFIG["hidden_size"] // HEADS


@pytest.fixture(scope="module")
def llama():
    return tiny_llama(), exported()


def test_groups_per_decoder_layer(llama):
    _, proto = llama
    result = analysis_pipeline().run(ir.serde.deserialize_model(proto))
    blocks = result.get(AttentionBlocks).blocks
    assert [(b.heads, b.kv_heads, b.head_dim) for b in blocks] == [(HEADS, KV_HEADS, HEAD_DIM)] * LAYERS
    assert all(None not in (b.query, b.key, b.value, b.output) for b in blocks), "Q and K found through RoPE"
    groups = result.get(DependencyGroups).groups
    assert [(g.kind, g.num_units, len(g.producers), len(g.consumers)) for g in groups] == [
        ("heads", KV_HEADS, 3, 1),  # a key/value head and its query heads: Q, K, V rows and O columns
        ("channels", CONFIG["intermediate_size"], 2, 1),  # SwiGLU: gate and up rows, the down column
    ] * LAYERS
    assert all(g.prunable for g in groups)


def _zero_removed_inputs(module, groups: DependencyGroups, removed: np.ndarray, blocks, ffn_groups) -> None:
    """Zero, in torch, the o_proj / down_proj input columns whose ONNX counterparts lost their rows."""
    import torch

    kept = groups.kept_indices(removed)
    with torch.no_grad():
        for layer, block, ffn in zip(module.model.layers, blocks, ffn_groups):
            for linear, weight in ((layer.self_attn.o_proj, block), (layer.mlp.down_proj, ffn)):
                features = linear.weight.shape[1]
                gone = np.setdiff1d(np.arange(features), kept.get((weight, 0), np.arange(features)))
                linear.weight[:, gone] = 0.0


def test_pruned_equals_masked_and_runs_in_onnxruntime(llama):
    module, proto = copy.deepcopy(llama[0]), llama[1]  # masked below
    analysed = analysis_pipeline().run(ir.serde.deserialize_model(proto))
    weights = {n.name: n.inputs[1].name for n in analysed.model.graph if n.op_type == "MatMul"}
    o_weights = [weights[b.output] for b in analysed.get(AttentionBlocks).blocks]
    down_weights = [g.consumers[0] for g in analysed.get(DependencyGroups).groups if g.kind == "channels"]

    result = channel_pruning_pipeline(0.4, prune=("channels", "heads"), importance="random", round_to=1).run(
        ir.serde.deserialize_model(proto)
    )
    groups, removed = result.get(DependencyGroups), result.get(Allocation).removed
    heads_removed = [int(removed[g.units].sum()) for g in groups.groups if g.kind == "heads"]
    assert sum(heads_removed) >= 1 and max(heads_removed) < KV_HEADS
    _zero_removed_inputs(module, groups, removed, o_weights, down_weights)
    ids = token_batches(1, batch=2, length=9)[0]["input_ids"]
    actual = run_onnx(result.model, {"input_ids": ids})[0]
    assert actual.shape == (2, 9, CONFIG["vocab_size"])
    assert max_relative_difference([actual], [torch_logits(module, ids)]) <= 1e-5
    params = sum(v.const_value.size for v in result.model.graph.initializers.values())
    dense = sum(v.const_value.size for v in ir.serde.deserialize_model(proto).graph.initializers.values())
    assert params < dense


def test_removing_a_decoder_layer_equals_skipping_it(llama):
    module, proto = llama
    calibration = CalibrationData.from_iterable(ir.serde.deserialize_model(proto), token_batches(2), batch_size=4)
    model = ir.serde.deserialize_model(proto)
    result = Pipeline([*preparation_passes(), FindResidualBlocks(calibration), PruneBlocks(count=1)]).run(model)
    blocks = result.get(ResidualBlocks).blocks
    assert len(blocks) == LAYERS and all(b.name.startswith("layer:") and b.attention for b in blocks)
    assert all(0 < b.influence < 1 for b in blocks)
    removed = result.get(BlockPruneReport).removed
    dropped = min(range(LAYERS), key=lambda i: blocks[i].influence)
    assert removed == [blocks[dropped].name]
    ids = token_batches(1, batch=2, length=9, seed=3)[0]["input_ids"]
    actual = run_onnx(result.model, {"input_ids": ids})[0]
    layers = module.model.layers
    module.model.layers = type(layers)([layer for i, layer in enumerate(layers) if i != dropped])
    try:
        expected = torch_logits(module, ids)
    finally:
        module.model.layers = layers
    assert max_relative_difference([actual], [expected]) <= 1e-5
