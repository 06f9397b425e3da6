"""The metanetwork: the identity until trained, changes only real weights once it is not, gradients reach it
through the rewritten network, and it is equivariant to permuting a network's hidden channels."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
import zoo

from pcc.compiler import from_torch
from pcc.compiler.torch_module import IRModule
from pcc.metanet.graph import EDGE_WIDTH
from pcc.metanet.model import Metanetwork, MetanetworkConfig
from tests.conftest import max_relative_difference, run_onnx
from tests.metanet.conftest import analyse


def _random_head(metanet: Metanetwork, seed: int = 1, std: float = 0.3) -> Metanetwork:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        metanet.head.weight.copy_(torch.randn(metanet.head.weight.shape, generator=generator) * std)
        metanet.head.bias.copy_(torch.randn(metanet.head.bias.shape, generator=generator) * std)
    return metanet


def _feeds(model, example: np.ndarray) -> dict[str, np.ndarray]:
    return {model.graph.inputs[0].name: example}


@pytest.mark.parametrize("name", ["resnet_basic", "mobilenet_v2"])
def test_untrained_metanetwork_is_exactly_the_identity(zoo_cache, name):
    model, _, graph = analyse(zoo_cache.model(name))
    torch.manual_seed(0)
    metanet = Metanetwork().eval()
    with torch.no_grad():
        values = metanet(graph.data)
    assert values.shape == (graph.data.num_edges, EDGE_WIDTH)
    assert torch.equal(values, graph.data.weight_values)
    feeds = _feeds(model, zoo_cache.example_input(name))
    module = IRModule(model).eval()
    with torch.no_grad():
        rewritten = [t.numpy() for t in module(feeds, weights=graph.to_weights(values))]
        own = [t.numpy() for t in module(feeds)]
    assert max_relative_difference(rewritten, own) <= 1e-6
    assert max_relative_difference(rewritten, run_onnx(zoo_cache.path(name), feeds)) <= 1e-6


@pytest.mark.parametrize("name", ["resnet_basic", "mobilenet_v2", "mlp"])
def test_a_trained_head_changes_weights_only_in_real_slots(zoo_cache, name):
    model, _, graph = analyse(zoo_cache.model(name))
    torch.manual_seed(0)
    metanet = _random_head(Metanetwork(MetanetworkConfig(hidden=16, layers=2))).eval()
    with torch.no_grad():
        values = metanet(graph.data)
    data = graph.data
    padding = data.value_mask == 0
    change = values - data.weight_values
    assert (values[padding] == 0).all() and (change[padding] == 0).all()
    assert (change[~padding] != 0).float().mean() > 0.99  # (a few may cancel exactly, not many)
    # the change is in units of each parameter's RMS: the same network ten times larger changes ten times more
    larger = data.clone()
    larger.weight_values, larger.value_scale = 10 * data.weight_values, 10 * data.value_scale
    with torch.no_grad():
        assert torch.allclose(metanet(larger), 10 * values, rtol=1e-5, atol=1e-6)
    weights = graph.to_weights(values)
    for parameter, tensor in weights.items():
        original = np.array(model.graph.initializers[parameter].const_value.numpy())
        assert tuple(tensor.shape) == original.shape and tensor.dtype == torch.float32, parameter
        assert not torch.equal(tensor, torch.from_numpy(original)), parameter
    feeds = _feeds(model, zoo_cache.example_input(name))
    module = IRModule(model).eval()
    with torch.no_grad():
        outputs = module(feeds, weights=weights)
        reference = module(feeds)
    assert all(torch.isfinite(o).all() for o in outputs)
    assert [o.shape for o in outputs] == [o.shape for o in reference]
    assert max_relative_difference([o.numpy() for o in outputs], [o.numpy() for o in reference]) > 1e-3


def test_gradients_of_the_rewritten_network_reach_the_metanetwork(zoo_cache):
    model, _, graph = analyse(zoo_cache.model("resnet_basic"))
    module = IRModule(model).eval()
    feeds = _feeds(model, zoo_cache.example_input("resnet_basic"))
    torch.manual_seed(0)
    identity = Metanetwork()
    module(feeds, weights=graph.to_weights(identity(graph.data)))[0].square().sum().backward()
    # from the identity only the head can move first, and it does; the network's own weights are not used
    assert identity.head.weight.grad.abs().sum() > 0 and identity.head.bias.grad.abs().sum() > 0
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in module.parameters())
    trained = _random_head(Metanetwork())
    module(feeds, weights=graph.to_weights(trained(graph.data)))[0].square().sum().backward()
    unreached = {name for name, p in trained.named_parameters() if p.grad is None or p.grad.abs().sum() == 0}
    assert not unreached  # every parameter shapes the output (the last layer has no node update to waste)
    assert trained.node_embed.weight.grad.abs().sum() > 0 and trained.edge_embed.weight.grad.abs().sum() > 0


def _conv_net() -> nn.Sequential:
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3),
    )
    return zoo.randomize_norms(net).eval()


def test_permuting_hidden_channels_permutes_the_new_weights():
    """Channels are graph nodes, so a network with its hidden channels reordered (the same function) gets
    the same new weights, reordered the same way, and the two rewritten networks agree."""
    torch.manual_seed(0)
    network = _conv_net()
    permuted = copy.deepcopy(network)
    order = torch.tensor([2, 0, 3, 1])
    with torch.no_grad():
        conv, norm = permuted[0], permuted[1]
        for tensor in (conv.weight, conv.bias, norm.weight, norm.bias, norm.running_mean, norm.running_var):
            tensor.copy_(tensor[order])
        permuted[3].weight.copy_(permuted[3].weight[:, order])
    image = torch.randn(2, 1, 8, 8)
    assert torch.allclose(network(image), permuted(image), atol=1e-6)
    models, weights = [], []
    metanet = _random_head(Metanetwork()).eval()
    for net in (network, permuted):
        model, _, graph = analyse(from_torch(net, (image,), input_names=["x"], optimize=False))
        with torch.no_grad():
            weights.append(graph.to_weights(metanet(graph.data)))
        models.append(model)
    first, second = weights
    assert set(first) == set(second)
    assert not torch.allclose(first["0.weight"], second["0.weight"])
    for name, tensor in first.items():
        if name.startswith(("0.", "1.")):
            tensor = tensor[order]
        elif name == "3.weight":
            tensor = tensor[:, order]
        assert torch.allclose(tensor, second[name], rtol=1e-4, atol=1e-6), name
    feeds = {"x": image.numpy()}
    with torch.no_grad():
        outputs = [IRModule(model).eval()(feeds, weights=w)[0] for model, w in zip(models, weights)]
    assert torch.allclose(outputs[0], outputs[1], rtol=1e-4, atol=1e-5)
