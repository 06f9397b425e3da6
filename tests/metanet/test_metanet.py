"""The graph metanetwork: exact channel-graph round trip, identity when untrained, a tiny meta-training that
sparsifies group norms, and the shipped weights on models it never saw."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from torch import nn

from pcc.compiler import from_torch
from pcc.compiler.pipeline import Pipeline, analysis_pipeline, channel_pruning_pipeline, preparation_passes
from pcc.compiler.torch_module import IRModule, trainable_initializers
from pcc.metanet import (
    SHIPPED_WEIGHTS, MetanetReport, MetanetTransform, Metanetwork, build_channel_graph, group_norm_sparsity,
    load_metanetwork, meta_train, prepare,
)
from pcc.passes.analysis import DependencyGroups
from pcc.passes.analysis.cost import CostReport
from pcc.passes.analysis.dependency_groups import BuildDependencyGroups
from tests.compiler.test_cli import pcc
from tests.conftest import run_onnx

ZOO_MODELS = ["resnet_basic", "mobilenet_v2", "mlp", "densenet", "tiny_gpt"]


def _graph(model: ir.Model):
    result = analysis_pipeline().run(model)
    return result.model, result.get(DependencyGroups), build_channel_graph(result.model, result.get(DependencyGroups))


@pytest.mark.parametrize("name", ZOO_MODELS)
def test_weights_read_back_from_the_graph_are_exact(zoo_cache, name):
    model, _, graph = _graph(zoo_cache.model(name))
    weights = graph.to_weights(graph.data.weight_values)
    for parameter, tensor in weights.items():
        assert np.array_equal(tensor.numpy(), model.graph.initializers[parameter].const_value.numpy()), parameter
    assert set(weights) | set(graph.untouched) == set(trainable_initializers(model))
    assert len(weights) > len(graph.untouched)


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.branch = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return self.head((x + self.branch(x)).mean((2, 3)))


def test_channels_are_nodes_and_weights_edges():
    torch.manual_seed(0)
    model, groups, graph = _graph(from_torch(_Residual().eval(), (torch.randn(2, 1, 8, 8),), optimize=False))
    by_name = {p.name: p for p in graph.parameters}
    kinds = {p.kind for p in graph.parameters}
    assert kinds == {"weight", "shift", "norm_scale"}
    conv = next(p for p in graph.parameters if p.shape == (4, 4, 3, 3))
    assert len(np.unique(conv.edge)) == 16 and graph.data.value_mask[np.unique(conv.edge)].sum() == 4 * 4 * 9
    linear = next(p for p in graph.parameters if p.kind == "weight" and len(p.shape) == 2)
    assert len(np.unique(linear.edge)) == 12 and graph.data.value_mask[np.unique(linear.edge)].sum() == 12
    # the stem's output channels and the branch's output channels meet in one Add: one node each
    stem = next(p for p in graph.parameters if p.shape == (4, 1, 3, 3))
    targets = graph.data.edge_index[1]
    assert set(targets[stem.edge].tolist()) == set(targets[conv.edge].tolist())
    # every bias / norm element is its own edge from its parameter's source node
    for parameter in by_name.values():
        if parameter.kind != "weight":
            sources = graph.data.edge_index[0][parameter.edge]
            assert len(parameter.edge) == int(np.prod(parameter.shape)) and len(set(sources.tolist())) == 1


@pytest.mark.parametrize("name", ["resnet_basic", "mobilenet_v2"])
def test_untrained_metanetwork_is_the_identity(zoo_cache, name):
    model, _, graph = _graph(zoo_cache.model(name))
    values = Metanetwork()(graph.data)
    assert torch.equal(values, graph.data.weight_values)
    module = IRModule(model).eval()
    feeds = {"x": torch.from_numpy(zoo_cache.example_input(name))}
    with torch.no_grad():
        transformed = module(feeds, weights=graph.to_weights(values))[0]
        reference = module(feeds)[0]
    assert torch.allclose(transformed, reference, rtol=0, atol=1e-6)


def _tiny_cnn(width: int, seed: int) -> ir.Model:
    torch.manual_seed(seed)
    module = nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 4),
    ).eval()
    return from_torch(module, (torch.randn(2, 1, 8, 8),), input_names=["x"], optimize=False, dynamic_batch=True)


def test_tiny_meta_training_lowers_the_loss_and_sparsifies_group_norms():
    data_models = [prepare(_tiny_cnn(width, seed), f"cnn{width}") for seed, width in enumerate((6, 8))]
    images = np.random.default_rng(0).standard_normal((512, 1, 8, 8)).astype(np.float32)
    # a learnable task: each model's own top-1 on the images
    labels = {m.name: m.logits(m.graph.data.weight_values, {"x": images}).argmax(1).detach().numpy() for m in data_models}

    def batches(data_model, rng):
        pick = rng.choice(len(images), 64, replace=False)
        return {"x": images[pick]}, labels[data_model.name][pick]

    metanet = Metanetwork()
    before = [group_norm_sparsity(m.graph, m.groups, m.graph.data.weight_values) for m in data_models]
    log = meta_train(metanet, data_models, batches, steps=120, alpha=0.5, lr=3e-3)
    assert all(np.isfinite(log.task_loss))
    assert log.window(log.sparsity_loss, last=True) < log.window(log.sparsity_loss, last=False)
    with torch.no_grad():
        after = [group_norm_sparsity(m.graph, m.groups, metanet(m.graph.data)) for m in data_models]
    assert all(a > b for a, b in zip(after, before)), (before, after)


def test_shipped_weights_load_and_transform_a_model_they_never_saw(zoo_cache):
    assert SHIPPED_WEIGHTS.stat().st_size < 1 << 20
    assert load_metanetwork().num_parameters > 0
    result = Pipeline([*preparation_passes(), BuildDependencyGroups(), MetanetTransform()]).run(zoo_cache.model("resnet_basic"))
    report = result.get(MetanetReport)
    assert report.parameters > 0 and 0 < report.relative_change < 1 and report.group_norm_ratio < 1
    proto = ir.serde.serialize_model(result.model)
    onnx.checker.check_model(proto, full_check=True)
    (logits,) = run_onnx(proto.SerializeToString(), {"x": zoo_cache.example_input("resnet_basic")})
    assert np.isfinite(logits).all()


def test_metanet_allocator_prunes_and_is_skipped_at_sparsity_zero(zoo_cache):
    result = channel_pruning_pipeline(0.5, allocator="metanet", budget="macs").run(zoo_cache.model("resnet_basic"))
    costs = result.get(CostReport).costs
    assert costs["after"].macs < 0.6 * costs["before"].macs and result.get(MetanetReport) is not None
    same = channel_pruning_pipeline(0.0, allocator="metanet").run(zoo_cache.model("resnet_basic"))
    feeds = {"x": zoo_cache.example_input("resnet_basic")}
    (expected,) = run_onnx(zoo_cache.path("resnet_basic"), feeds)
    (got,) = run_onnx(ir.serde.serialize_model(same.model).SerializeToString(), feeds)
    assert np.allclose(got, expected, rtol=0, atol=1e-6)


def test_cli_allocator_metanet(tmp_path, zoo_cache):
    out = tmp_path / "pruned.onnx"
    done = pcc("compile", zoo_cache.path("resnet_basic"), "--sparsity", "0.5", "--budget", "macs", "--allocator",
               "metanet", "-o", out, "--repeats", "2")
    assert done.returncode == 0, done.stderr
    onnx.checker.check_model(str(out), full_check=True)
