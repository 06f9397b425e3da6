"""The channel graph: channels are nodes, weights are edges, and reading the edges back gives every weight
bit for bit, on zoo models with residual sums, depthwise convs, concatenation and attention."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from pcc.compiler import from_torch
from pcc.compiler.torch_module import trainable_initializers
from pcc.metanet.graph import EDGE_KINDS, EDGE_WIDTH
from tests.metanet.conftest import analyse

ROUND_TRIP_MODELS = ["resnet_basic", "mobilenet_v2", "mlp", "densenet", "tiny_gpt"]
INPUT, OUTPUT, SOURCE, PRUNABLE = range(4)  # node feature columns


@pytest.mark.parametrize("name", ROUND_TRIP_MODELS)
def test_every_weight_reads_back_from_the_graph_bit_for_bit(zoo_cache, name):
    model, groups, graph = analyse(zoo_cache.model(name))
    weights = graph.to_weights(graph.data.weight_values)
    assert len(weights) == len(graph.parameters) > 0
    for parameter, tensor in weights.items():
        expected = model.graph.initializers[parameter].const_value.numpy()
        assert tensor.shape == expected.shape and np.array_equal(tensor.numpy(), expected), parameter
    # trainable initializers are either rewritable parameters or listed as untouched, never both or neither
    trainable = set(trainable_initializers(model))
    assert set(weights) | set(graph.untouched) == trainable and not set(weights) & set(graph.untouched)
    # every conv, linear and matmul weight is in the graph
    layer_weights = {
        node.inputs[1].name for node in model.graph
        if node.op_type in ("Conv", "Gemm", "MatMul") and node.inputs[1].name in model.graph.initializers
    }
    assert layer_weights and layer_weights <= set(weights)
    # every unit of every dependency group (a channel, a head) is exactly one channel node
    units = graph.unit_of_node[graph.unit_of_node >= 0]
    assert groups.num_units > 0 and (np.bincount(units, minlength=groups.num_units) == 1).all()


@pytest.mark.parametrize("name", ROUND_TRIP_MODELS)
def test_every_element_has_its_own_slot_and_padding_is_zero(zoo_cache, name):
    _, _, graph = analyse(zoo_cache.model(name))
    data = graph.data
    slots = np.concatenate([p.edge * EDGE_WIDTH + p.slot for p in graph.parameters])
    assert len(np.unique(slots)) == len(slots) == int(data.value_mask.sum())
    mask = data.value_mask.reshape(-1).numpy()
    assert (mask[slots] == 1).all()
    assert (data.weight_values.reshape(-1).numpy()[mask == 0] == 0).all()
    # each edge belongs to one parameter, and the edges are exactly those of the parameters
    edges = np.concatenate([np.unique(p.edge) for p in graph.parameters])
    assert len(np.unique(edges)) == len(edges) == data.num_edges
    # the GNN sees each parameter divided by its RMS
    for parameter in graph.parameters:
        values = data.weight_values[parameter.edge, parameter.slot].double()
        rms = float(values.square().mean().sqrt()) or 1.0
        assert torch.allclose(data.value_scale[parameter.edge, 0].double(), torch.tensor(rms, dtype=torch.float64), rtol=1e-6)
    normalised = data.edge_attr[:, :EDGE_WIDTH] * data.value_scale
    assert torch.allclose(normalised, data.weight_values, rtol=1e-5, atol=1e-7)


class _ResidualNet(nn.Module):
    """Conv(1->4, 3x3)+BN+ReLU, then a residual pair (Conv 3x3 + BN, and a 1x1 Conv + BN shortcut) summed,
    global average pooling and a Linear(6->3)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.branch = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6))
        self.shortcut = nn.Sequential(nn.Conv2d(4, 6, 1, bias=False), nn.BatchNorm2d(6))
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(self.branch(x) + self.shortcut(x))
        return self.fc(x.mean((2, 3)))


@pytest.fixture(scope="module")
def residual_graph():
    torch.manual_seed(0)
    module = _ResidualNet().eval()
    model, groups, graph = analyse(from_torch(module, (torch.randn(2, 1, 8, 8),), optimize=False))
    return model, groups, graph, {p.name: p for p in graph.parameters}


def _ends(graph, parameter) -> tuple[np.ndarray, np.ndarray]:
    """Source and target node of each element of `parameter`, shaped like it."""
    source, target = graph.data.edge_index.numpy()
    return source[parameter.edge].reshape(parameter.shape), target[parameter.edge].reshape(parameter.shape)


def _per_output(nodes: np.ndarray) -> np.ndarray:
    """The node of each output channel (axis 0) of a weight, checking all its elements agree."""
    rows = nodes.reshape(nodes.shape[0], -1)
    assert (rows == rows[:, :1]).all()
    return rows[:, 0]


def test_weights_are_one_edge_per_channel_pair_carrying_the_kernel(residual_graph):
    _, _, graph, parameters = residual_graph
    mask, values, x = graph.data.value_mask, graph.data.weight_values, graph.data.x
    for name, (cout, cin), used in (
        ("stem.0.weight", (4, 1), 9), ("branch.0.weight", (6, 4), 9), ("shortcut.0.weight", (6, 4), 1), ("fc.weight", (3, 6), 1),
    ):
        parameter = parameters[name]
        edges = np.unique(parameter.edge)
        assert parameter.kind == "weight" and len(edges) == cin * cout, name
        assert (mask[edges].sum(1) == used).all(), name
        source, target = (nodes.reshape(cout, cin, -1)[..., 0].ravel() for nodes in _ends(graph, parameter))
        assert len(set(zip(source.tolist(), target.tolist()))) == cin * cout, name  # distinct node pairs
    # a 3x3 kernel fills one edge, in order
    branch = parameters["branch.0.weight"]
    kernels = branch.edge.reshape(6, 4, 9)
    assert (kernels == kernels[..., :1]).all() and (branch.slot.reshape(6, 4, 9) == np.arange(9)).all()
    weight = graph.to_weights(values)["branch.0.weight"]
    assert torch.equal(values[int(kernels[2, 3, 0])], weight[2, 3].reshape(-1))
    # the first conv reads the model's input channel, the linear writes its output channels
    stem_source, stem_target = _ends(graph, parameters["stem.0.weight"])
    fc_source, fc_target = _ends(graph, parameters["fc.weight"])
    assert (x[np.unique(stem_source), INPUT] == 1).all() and (x[np.unique(fc_target), OUTPUT] == 1).all()
    assert len(np.unique(fc_target)) == 3
    # layer to layer: the stem's output channels are the residual pair's inputs, whose outputs the linear reads
    branch_source, branch_target = _ends(graph, parameters["branch.0.weight"])
    assert set(np.unique(stem_target)) == set(np.unique(branch_source))
    assert set(np.unique(branch_target)) == set(np.unique(fc_source))


def test_channels_summed_by_a_residual_add_are_one_node(residual_graph):
    _, _, graph, parameters = residual_graph
    branch = _per_output(_ends(graph, parameters["branch.0.weight"])[1])
    shortcut = _per_output(_ends(graph, parameters["shortcut.0.weight"])[1])
    assert np.array_equal(branch, shortcut), "output channel o of both convs: one node"
    assert len(np.unique(branch)) == 6
    stem = _per_output(_ends(graph, parameters["stem.0.weight"])[1])
    assert len(np.unique(stem)) == 4 and not set(stem) & set(branch)
    # each channel node is a prunable unit of its dependency group; output and source nodes are none
    assert len(set(graph.unit_of_node[stem])) == 4 and len(set(graph.unit_of_node[branch])) == 6
    assert (graph.unit_of_node[branch] >= 0).all() and (graph.data.x[branch, PRUNABLE] == 1).all()
    fc_target = _ends(graph, parameters["fc.weight"])[1]
    assert (graph.unit_of_node[fc_target] == -1).all()


def test_vectors_are_one_edge_per_channel_from_their_own_source_node(residual_graph):
    model, _, graph, parameters = residual_graph
    x = graph.data.x
    kinds = {"stem.0.bias": "shift", "stem.1.weight": "norm_scale", "stem.1.bias": "shift", "branch.1.weight": "norm_scale",
             "branch.1.bias": "shift", "shortcut.1.weight": "norm_scale", "shortcut.1.bias": "shift", "fc.bias": "shift"}
    assert {name: parameters[name].kind for name in kinds} == kinds
    sources = []
    for parameter in graph.parameters:
        if parameter.kind in ("weight", "grouped_weight"):
            continue
        assert len(parameter.shape) == 1 and len(np.unique(parameter.edge)) == parameter.shape[0], parameter.name
        assert (graph.data.value_mask[parameter.edge].sum(1) == 1).all() and (parameter.slot == 0).all()
        source, target = _ends(graph, parameter)
        assert len(np.unique(source)) == 1 and x[source[0], SOURCE] == 1 and graph.unit_of_node[source[0]] == -1
        assert len(np.unique(target)) == parameter.shape[0]  # one edge to each channel it touches
        sources.append(int(source[0]))
        one_hot = graph.data.edge_attr[parameter.edge, 2 * EDGE_WIDTH : 2 * EDGE_WIDTH + len(EDGE_KINDS)]
        assert (one_hot.argmax(1) == EDGE_KINDS.index(parameter.kind)).all()
    assert len(set(sources)) == len(sources), "every vector parameter has its own source node"
    assert graph.data.num_nodes == int((x[:, SOURCE] == 0).sum()) + len(sources)
    # the two BatchNorms meeting in the residual sum stay two sets of values on the same channels
    branch_beta, shortcut_beta = (_ends(graph, parameters[f"{n}.1.bias"]) for n in ("branch", "shortcut"))
    assert np.array_equal(branch_beta[1], shortcut_beta[1]) and branch_beta[0][0] != shortcut_beta[0][0]
    # BatchNorm statistics are not parameters of the graph
    statistics = {n for n in model.graph.initializers if "running" in n}
    assert len(statistics) == 6 and not statistics & (set(parameters) | set(graph.untouched))


def test_node_norm_is_the_group_norm_of_the_channel(residual_graph):
    """A channel's norm: its output kernels, bias and BN terms, and its input kernels in the next layers."""
    _, _, graph, parameters = residual_graph
    norms = graph.node_norms(graph.data.weight_values)
    w = graph.to_weights(graph.data.weight_values)
    stem = _per_output(_ends(graph, parameters["stem.0.weight"])[1])
    for c in range(4):
        expected = sum(float(t.square().sum()) for t in (
            w["stem.0.weight"][c], w["stem.0.bias"][c], w["stem.1.weight"][c], w["stem.1.bias"][c],
            w["branch.0.weight"][:, c], w["shortcut.0.weight"][:, c],
        ))
        assert float(norms[stem[c]]) == pytest.approx(np.sqrt(expected), rel=1e-5)
    residual = _per_output(_ends(graph, parameters["shortcut.0.weight"])[1])
    for o in range(6):  # the convs' zero biases added by the export contribute nothing
        expected = sum(float(t.square().sum()) for t in (
            w["branch.0.weight"][o], w["branch.1.weight"][o], w["branch.1.bias"][o],
            w["shortcut.0.weight"][o], w["shortcut.1.weight"][o], w["shortcut.1.bias"][o], w["fc.weight"][:, o],
        ))
        assert float(norms[residual[o]]) == pytest.approx(np.sqrt(expected), rel=1e-5)
    # differentiable, and finite at zero
    values = torch.zeros_like(graph.data.weight_values, requires_grad=True)
    graph.node_norms(values).sum().backward()
    assert torch.isfinite(values.grad).all()


@pytest.mark.parametrize("groups", [4, 2])
def test_grouped_conv_is_self_loops_on_the_group_node(groups):
    torch.manual_seed(0)
    module = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1, groups=groups), nn.ReLU(),
        nn.Conv2d(4, 5, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3),
    ).eval()
    _, _, graph = analyse(from_torch(module, (torch.randn(2, 1, 8, 8),), optimize=False))
    parameters = {p.name: p for p in graph.parameters}
    grouped = parameters["2.weight"]
    assert grouped.kind == "grouped_weight" and parameters["4.weight"].kind == "weight"
    assert len(np.unique(grouped.edge)) == 4 * (4 // groups) and (graph.data.value_mask[grouped.edge].sum(1) == 9).all()
    source, target = _ends(graph, grouped)
    assert np.array_equal(source, target), "a grouped conv's kernels are self-loops"
    # its input and output channels are one node per group: the first conv writes the nodes it loops on
    first = _per_output(_ends(graph, parameters["0.weight"])[1])
    assert np.array_equal(first, _per_output(target)) and len(np.unique(first)) == groups
    # a self-loop counts once in its node's norm
    w = graph.to_weights(graph.data.weight_values)
    members = np.flatnonzero(first == first[0])
    expected = sum(float(t.square().sum()) for t in (
        w["0.weight"][members], w["0.bias"][members], w["2.weight"][members], w["2.bias"][members], w["4.weight"][:, members],
    ))
    assert float(graph.node_norms(graph.data.weight_values)[first[0]]) == pytest.approx(np.sqrt(expected), rel=1e-5)


def test_a_flatten_ties_the_linear_columns_of_a_channel_to_its_node():
    """Conv(1->4) -> Flatten -> Linear(4*36 -> 3): channel c owns the 36 columns c*36 .. c*36+35."""
    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3)).eval()
    _, _, graph = analyse(from_torch(module, (torch.randn(2, 1, 8, 8),), optimize=False))
    parameters = {p.name: p for p in graph.parameters}
    conv = _per_output(_ends(graph, parameters["0.weight"])[1])
    linear_source, linear_target = _ends(graph, parameters["3.weight"])
    assert len(np.unique(parameters["3.weight"].edge)) == 3 * 4 * 36  # parallel edges, one value each
    assert (linear_source.reshape(3, 4, 36) == conv[None, :, None]).all()
    assert len(np.unique(linear_target)) == 3
    w = graph.to_weights(graph.data.weight_values)
    norms = graph.node_norms(graph.data.weight_values)
    for c in range(4):
        columns = w["3.weight"][:, 36 * c : 36 * (c + 1)]
        expected = sum(float(t.square().sum()) for t in (w["0.weight"][c], w["0.bias"][c], columns))
        assert float(norms[conv[c]]) == pytest.approx(np.sqrt(expected), rel=1e-5)
