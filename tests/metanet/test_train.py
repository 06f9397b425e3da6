"""Meta-training on synthetic data: a few hundred steps on tiny CNNs lower the sparsity loss and make the
group norms sparser while the networks keep solving their task; the losses and the measure behave."""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir
import pytest
import torch
from torch import nn
import zoo

from pcc.compiler import from_torch
from pcc.metanet.model import Metanetwork, MetanetworkConfig
from pcc.metanet.train import DataModel, group_norm_sparsity, meta_train, prepare

CLASSES = 4
BATCH = 16
WIDTHS = [(4, 8), (6, 12), (8, 6)]


def _tiny_cnn(widths: tuple[int, int], seed: int) -> nn.Sequential:
    """Two Conv-BN-ReLU layers, pooling and a linear classifier; BatchNorm with trained-looking statistics
    and weights, logits scaled to a standard deviation of 2 so the network's own top-1 is a clear label."""
    torch.manual_seed(seed)
    first, second = widths
    net = nn.Sequential(
        nn.Conv2d(1, first, 3, padding=1, bias=False), nn.BatchNorm2d(first), nn.ReLU(),
        nn.Conv2d(first, second, 3, padding=1, bias=False), nn.BatchNorm2d(second), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(second, CLASSES),
    )
    zoo.randomize_norms(net, seed).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        scale = 2.0 / net(torch.randn(256, 1, 8, 8, generator=generator)).std()
        net[-1].weight.mul_(scale)
        net[-1].bias.mul_(scale)
    return net


def _export(net: nn.Module) -> ir.Model:
    return from_torch(net, (torch.zeros(BATCH, 1, 8, 8),), input_names=["x"], optimize=False)


@pytest.fixture(scope="module")
def data_models() -> list[DataModel]:
    return [prepare(_export(_tiny_cnn(widths, seed)), f"cnn{seed}") for seed, widths in enumerate(WIDTHS)]


def _own_labels(data_model: DataModel, rng: np.random.Generator) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """A learnable task: random images labelled with the data model's own top-1 (its input weights)."""
    images = rng.standard_normal((BATCH, 1, 8, 8)).astype(np.float32)
    with torch.no_grad():
        labels = data_model.logits(data_model.graph.data.weight_values, {"x": images}).argmax(1).numpy()
    return {"x": images}, labels


def test_meta_training_lowers_the_sparsity_loss_and_sparsifies_group_norms(data_models):
    before = [group_norm_sparsity(m.graph, m.groups, m.graph.data.weight_values) for m in data_models]
    torch.manual_seed(0)
    metanet = Metanetwork(MetanetworkConfig(hidden=16, layers=2))
    log = meta_train(metanet, data_models, _own_labels, steps=300, alpha=0.5, lr=3e-3, seed=0)
    assert log.steps == 300 and len(log.task_loss) == len(log.sparsity_loss) == 300
    assert np.isfinite(log.task_loss).all() and np.isfinite(log.sparsity_loss).all()
    assert log.window(log.sparsity_loss, last=True) < 0.5 * log.window(log.sparsity_loss, last=False)
    # the networks still solve their task: well below chance level, so the norms did not all collapse
    assert log.window(log.task_loss, last=True) < 0.5 * math.log(CLASSES)
    assert not metanet.training
    with torch.no_grad():
        after = [group_norm_sparsity(m.graph, m.groups, metanet(m.graph.data)) for m in data_models]
    assert all(a > b + 0.05 for a, b in zip(after, before)), (before, after)


def test_prepare_leaves_the_callers_model_and_freezes_the_network(data_models):
    model = _export(_tiny_cnn((4, 8), seed=5))
    initializers = {name: np.array(value.const_value.numpy()) for name, value in model.graph.initializers.items()}
    nodes = [node.op_type for node in model.graph]
    data_model = prepare(model, "copy")
    assert [node.op_type for node in model.graph] == nodes and set(model.graph.initializers) == set(initializers)
    assert all(np.array_equal(model.graph.initializers[n].const_value.numpy(), a) for n, a in initializers.items())
    assert data_model.model is not model and data_model.name == "copy"
    assert not data_model.module.training and not any(p.requires_grad for p in data_model.module.parameters())
    # the prunable channel nodes are the two conv layers' channels, in two groups
    assert len(data_model.prunable_nodes) == 4 + 8 and sorted(np.bincount(data_model.group_of_node.numpy())) == [4, 8]
    for m, (first, second) in zip(data_models, WIDTHS):
        assert len(m.prunable_nodes) == first + second


def test_group_lasso_is_relative_to_the_input_weights(data_models):
    for m in data_models:
        values = m.graph.data.weight_values
        assert float(m.group_lasso(values, strength=0.0)) == pytest.approx(1.0, rel=1e-6)
        assert float(m.group_lasso(0.5 * values, strength=0.0)) == pytest.approx(0.5, rel=1e-6)
        # weak units weigh more: at most 2^strength times the plain sum
        weighted = float(m.group_lasso(values))
        assert 1.0 < weighted < 2.0**4


def test_group_norm_sparsity_measures_how_few_units_hold_the_norm(data_models):
    for m in data_models:
        values = m.graph.data.weight_values
        dense = group_norm_sparsity(m.graph, m.groups, values)
        assert 0.0 <= dense < 0.2
        assert group_norm_sparsity(m.graph, m.groups, 3.0 * values) == pytest.approx(dense, abs=1e-6)
        # keep one unit per group: zero every edge touching another prunable channel
        source, target = m.graph.data.edge_index
        nodes = m.prunable_nodes
        keep = torch.zeros(m.graph.data.num_nodes, dtype=torch.bool)
        for group in m.group_of_node.unique():
            keep[nodes[m.group_of_node == group][0]] = True
        dropped = torch.zeros_like(keep)
        dropped[nodes] = ~keep[nodes]
        sparse = torch.where((dropped[source] | dropped[target])[:, None], 0.0, values)
        assert group_norm_sparsity(m.graph, m.groups, sparse) == pytest.approx(1.0, abs=1e-6)


def test_the_pruned_copy_is_the_network_without_each_layers_weakest_channels():
    """Zeroing the edges that leave the weakest half of each group equals masking those channels' outputs
    in the torch network, the weakest ranked by DepGraph's group norm written out by hand here."""
    net = _tiny_cnn((4, 8), seed=3)
    data_model = prepare(_export(net), "cnn")
    values = data_model.graph.data.weight_values
    assert torch.equal(data_model.without_weakest(values, 0.0), values)
    conv1, bn1, conv2, bn2, linear = net[0], net[1], net[3], net[4], net[-1]
    squares = lambda t, axis: (t.detach() ** 2).sum(dim=[d for d in range(t.dim()) if d != axis])  # noqa: E731
    norms = [
        squares(conv1.weight, 0) + bn1.weight.detach() ** 2 + bn1.bias.detach() ** 2 + squares(conv2.weight, 1),
        squares(conv2.weight, 0) + bn2.weight.detach() ** 2 + bn2.bias.detach() ** 2 + squares(linear.weight, 1),
    ]
    masks = [torch.ones_like(n).index_fill(0, n.argsort()[: len(n) // 2], 0.0) for n in norms]
    net[2].register_forward_hook(lambda _m, _i, out: out * masks[0][:, None, None])
    net[5].register_forward_hook(lambda _m, _i, out: out * masks[1][:, None, None])
    images = np.random.default_rng(0).standard_normal((BATCH, 1, 8, 8)).astype(np.float32)
    with torch.no_grad():
        expected = net(torch.from_numpy(images))
        got = data_model.logits(data_model.without_weakest(values, 0.5), {"x": images})
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_prune_aware_meta_training_lowers_the_pruned_copys_loss(data_models):
    torch.manual_seed(0)
    metanet = Metanetwork(MetanetworkConfig(hidden=16, layers=2))
    log = meta_train(metanet, data_models, _own_labels, steps=200, alpha=0.1, lr=3e-3, prune_aware=1.0, seed=0)
    assert len(log.pruned_task_loss) == 200 and "pruned-copy task loss" in log.summary()
    assert log.window(log.pruned_task_loss, last=True) < 0.7 * log.window(log.pruned_task_loss, last=False)


def test_meta_training_needs_a_data_model():
    with pytest.raises(ValueError, match="at least one data model"):
        meta_train(Metanetwork(), [], _own_labels, steps=1)
