"""A network as a graph of its channels: the input of the metanetwork (Meta Pruning via Graph Metanetworks).

Nodes are channels and weights are edges, built from pcc's dependency analysis rather than per-architecture
converters, so any graph pcc can group becomes a metanetwork input:

- **Channel nodes** are the connected components of the channel relation (`DependencyGroups.components`):
  channels that are one channel (the convs feeding a residual sum, a depthwise conv's input and output,
  a concat's inputs and its output slices) are one node. Model input and output channels are nodes too.
- **Weight edges**: a weight with an input and an output channel axis (Conv with group 1, Gemm, a 2-D
  MatMul weight) gives one edge per (input channel, output channel) pair, carrying that pair's kernel
  (k x k values; kernels larger than `EDGE_WIDTH` are split over parallel edges). A grouped or depthwise
  conv, whose group is one node, gives self-loops carrying each (output, input-in-group) kernel.
- **Vector edges**: a per-channel parameter (bias, norm gamma and beta, a scale) gets its own source node,
  with one edge to each channel it touches carrying its value, so two biases meeting in a residual sum stay
  two values.

Every element of every transformed parameter sits in exactly one (edge, slot), so reading the edge values
back gives the weights exactly (`ChannelGraph.to_weights`). Trainable float parameters up to 32 bits only
(edge values are float32): BatchNorm running statistics, float64 tensors and parameters of no recognised
structure (a positional encoding, a scalar clip bound) are left as they are and listed in
`ChannelGraph.untouched`. A table with only an output-channel axis (a token embedding [vocab, d]) is read
like a grouped weight: one self-loop per (channel, row).

The GNN sees normalised values: each parameter's values divided by its RMS (`value_scale`), since layers
of one network differ in scale by orders of magnitude and the same metanetwork must serve them all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
import torch
from torch_geometric.data import Data

from pcc.compiler.torch_module import trainable_initializers
from pcc.passes.analysis.channel_rules import Role
from pcc.passes.analysis.dependency_groups import DependencyGroups

__all__ = [
    "EDGE_FEATURES", "EDGE_KINDS", "EDGE_WIDTH", "NODE_FEATURES", "ChannelGraph", "ParameterEdges", "build_channel_graph",
    "prunable_nodes",
]

EDGE_WIDTH = 9  # values per edge: a 3x3 kernel; a 1x1 conv or linear weight uses slot 0
EDGE_KINDS = ("weight", "grouped_weight", "shift", "norm_scale", "scale")
_VECTOR_KIND = {Role.SHIFT: "shift", Role.NORM_SCALE: "norm_scale", Role.SCALE: "scale"}
# node features: model input channel, model output channel, parameter source, prunable unit, depth in [0, 1]
NODE_FEATURES = 5
# edge features: normalised values, which slots hold values, kind one-hot, depth of the parameter in [0, 1]
EDGE_FEATURES = 2 * EDGE_WIDTH + len(EDGE_KINDS) + 1


@dataclass(frozen=True)
class ParameterEdges:
    """Where one parameter's elements live: element n (flattened) is `values[edge[n], slot[n]]`."""

    name: str
    shape: tuple[int, ...]
    edge: np.ndarray
    slot: np.ndarray
    kind: str


@dataclass
class ChannelGraph:
    """A model's channel graph (`data`, a torch_geometric `Data`) and the map back to its parameters.

    `data.edge_index` [2, E] (source channel -> destination channel), `data.x` [N, NODE_FEATURES],
    `data.edge_attr` [E, EDGE_FEATURES], `data.weight_values` [E, EDGE_WIDTH] the raw parameter values,
    `data.value_scale` [E, 1] the RMS of each edge's parameter, `data.value_mask` [E, EDGE_WIDTH] the
    slots that hold a value. `unit_of_node` [N]: the dependency-group unit a channel node is (-1: none).
    """

    data: Data
    parameters: list[ParameterEdges]
    unit_of_node: np.ndarray
    untouched: list[str] = field(default_factory=list)

    def prunable_node_ids(self, groups: DependencyGroups) -> np.ndarray:
        """The channel nodes that are units of prunable groups: what the sparsity loss and measures read."""
        return np.flatnonzero(prunable_nodes(self.unit_of_node, groups))

    def to_weights(self, values: torch.Tensor) -> dict[str, torch.Tensor]:
        """Parameter tensors (by initializer name) read from edge values [E, EDGE_WIDTH]; differentiable."""
        return {
            p.name: values[torch.from_numpy(p.edge), torch.from_numpy(p.slot)].reshape(p.shape)
            for p in self.parameters
        }

    def node_norms(self, values: torch.Tensor) -> torch.Tensor:
        """Per channel node: the L2 norm of every parameter element that belongs to it (DepGraph's group
        norm of a unit: its output kernels, its input kernels in the next layers, its bias and norm terms)."""
        squares = (values * values).sum(1)
        source, target = self.data.edge_index
        nodes = self.data.num_nodes
        into = torch.zeros(nodes, dtype=values.dtype).index_add(0, target, squares)
        out_of = torch.zeros(nodes, dtype=values.dtype).index_add(0, source, torch.where(source == target, 0, squares))
        return torch.sqrt((into + out_of).clamp_min(1e-24))  # the clamp keeps gradients finite at 0


def build_channel_graph(model: ir.Model, groups: DependencyGroups) -> ChannelGraph:
    """The channel graph of `model` (after `BuildDependencyGroups`): see the module docstring."""
    trainable = set(trainable_initializers(model))
    order = {value.name: i for i, value in enumerate(_parameters_in_use_order(model))}
    roles = _axis_roles(groups)
    components = groups.components
    channel_nodes = int(components.max()) + 1 if len(components) else 0
    rows = _EdgeRows()
    parameters, untouched, sources = [], [], 0
    depth_of_parameter = {name: i / max(len(order) - 1, 1) for name, i in order.items()}
    for name in sorted(trainable, key=lambda n: order.get(n, len(order))):
        array = model.graph.initializers[name].const_value.numpy()
        if array.dtype == np.float64:
            untouched.append(name)
            continue
        axes = roles.get(name, {})
        out_axes = [a for a, r in axes.items() if r is Role.OUT]
        in_axes = [a for a, r in axes.items() if r is Role.IN]
        vector_axes = [a for a, r in axes.items() if r in _VECTOR_KIND]
        depth = depth_of_parameter.get(name, 0.0)
        in_axis = in_axes[0] if len(in_axes) == 1 else None
        out_ids = groups.channel_components(name, out_axes[0]) if len(out_axes) == 1 else None
        in_ids = groups.channel_components(name, in_axis) if in_axis is not None else out_ids
        vector_ids = groups.channel_components(name, vector_axes[0]) if len(vector_axes) == 1 else None
        if out_ids is not None and in_ids is not None and len(in_axes) <= 1 and array.ndim >= 2:
            kind = "weight" if in_axis is not None else "grouped_weight"
            parameters.append(rows.add_weight(name, array, out_axes[0], in_axis, out_ids, in_ids, kind, depth))
        elif vector_ids is not None and array.size == len(vector_ids):
            source = channel_nodes + sources
            sources += 1
            parameters.append(rows.add_vector(name, array, vector_ids, source, _VECTOR_KIND[axes[vector_axes[0]]], depth))
        else:
            untouched.append(name)
    data = rows.finish(num_nodes=channel_nodes + sources)
    unit_of_node = _units_of_nodes(groups, channel_nodes + sources)
    data.x = _node_features(model, groups, data, channel_nodes, unit_of_node)
    return ChannelGraph(data, parameters, unit_of_node, sorted(untouched))


class _EdgeRows:
    """Accumulates edges; each parameter appends a block of rows."""

    def __init__(self) -> None:
        self.sources, self.targets, self.values, self.masks, self.scales, self.kinds, self.depths = ([] for _ in range(7))
        self.count = 0

    def add_weight(self, name, array, out_axis, in_axis, out_ids, in_ids, kind, depth) -> ParameterEdges:
        """One edge per (in, out) channel pair (per (out, j) for grouped weights), kernels split by EDGE_WIDTH."""
        leading = [out_axis] + ([in_axis] if in_axis is not None else [])
        rest = [a for a in range(array.ndim) if a not in leading]
        if in_axis is None:  # grouped conv [O, I/g, k...]: the in-group axis is a pair axis too, not kernel
            leading, rest = [out_axis, rest[0]], rest[1:]
        moved = np.transpose(np.arange(array.size).reshape(array.shape), leading + rest)
        pairs = moved.reshape(moved.shape[0] * moved.shape[1], -1)  # [pairs, kernel], flat element ids
        kernel = pairs.shape[1]
        chunks = math.ceil(kernel / EDGE_WIDTH)
        out_index = np.repeat(np.arange(moved.shape[0]), moved.shape[1])
        in_index = np.tile(np.arange(moved.shape[1]), moved.shape[0])
        targets = np.repeat(out_ids[out_index], chunks)
        sources = np.repeat(in_ids[in_index] if kind == "weight" else out_ids[out_index], chunks)
        edge = np.empty(array.size, np.int64)
        slot = np.empty(array.size, np.int64)
        position = np.arange(kernel)
        edge[pairs] = self.count + np.arange(len(pairs))[:, None] * chunks + position // EDGE_WIDTH
        slot[pairs] = np.broadcast_to(position % EDGE_WIDTH, pairs.shape)
        return self._append(name, array, edge, slot, sources, targets, kind, depth)

    def add_vector(self, name, array, ids, source, kind, depth) -> ParameterEdges:
        edge = self.count + np.arange(array.size)
        return self._append(name, array, edge, np.zeros(array.size, np.int64), np.full(array.size, source),
                            ids, kind, depth)

    def _append(self, name, array, edge, slot, sources, targets, kind, depth) -> ParameterEdges:
        count = len(targets)
        local = edge - self.count
        values = np.zeros((count, EDGE_WIDTH), np.float32)
        mask = np.zeros((count, EDGE_WIDTH), np.float32)
        values[local, slot] = array.reshape(-1)
        mask[local, slot] = 1
        rms = float(np.sqrt(np.mean(np.square(array, dtype=np.float64)))) or 1.0
        self.sources.append(np.asarray(sources, np.int64))
        self.targets.append(np.asarray(targets, np.int64))
        self.values.append(values)
        self.masks.append(mask)
        self.scales.append(np.full((count, 1), rms, np.float32))
        self.kinds.append(np.full(count, EDGE_KINDS.index(kind)))
        self.depths.append(np.full((count, 1), depth, np.float32))
        self.count += count
        return ParameterEdges(name, tuple(array.shape), edge, slot, kind)

    def finish(self, num_nodes: int) -> Data:
        cat = lambda parts, shape: np.concatenate(parts) if parts else np.zeros(shape)  # noqa: E731
        values = torch.from_numpy(cat(self.values, (0, EDGE_WIDTH)).astype(np.float32))
        mask = torch.from_numpy(cat(self.masks, (0, EDGE_WIDTH)).astype(np.float32))
        scale = torch.from_numpy(cat(self.scales, (0, 1)).astype(np.float32))
        kinds = torch.nn.functional.one_hot(torch.from_numpy(cat(self.kinds, (0,)).astype(np.int64)), len(EDGE_KINDS))
        depth = torch.from_numpy(cat(self.depths, (0, 1)).astype(np.float32))
        edge_attr = torch.cat([values / scale, mask, kinds.float(), depth], dim=1)
        edge_index = torch.from_numpy(np.stack([cat(self.sources, (0,)), cat(self.targets, (0,))]).astype(np.int64))
        return Data(edge_index=edge_index, edge_attr=edge_attr, weight_values=values, value_mask=mask, value_scale=scale,
                    num_nodes=num_nodes)


def _axis_roles(groups: DependencyGroups) -> dict[str, dict[int, Role]]:
    roles: dict[str, dict[int, Role]] = {}
    for space in groups.spaces:
        if space.is_param and space.role is not None:
            roles.setdefault(space.value, {})[space.axis] = space.role
    return roles


def _parameters_in_use_order(model: ir.Model) -> list[ir.Value]:
    """Initializers in the order the (sorted) graph first reads them: a parameter's depth in the network."""
    seen: dict[str, ir.Value] = {}
    for node in model.graph:
        for value in node.inputs:
            if value is not None and value.name in model.graph.initializers and value.name not in seen:
                seen[value.name] = value
    return list(seen.values())


def _node_features(model, groups, data, channel_nodes, unit_of_node) -> torch.Tensor:
    nodes = len(unit_of_node)
    x = torch.zeros(nodes, NODE_FEATURES)
    for values, column in ((model.graph.inputs, 0), (model.graph.outputs, 1)):
        for value in values:
            for axis in range(len(value.shape or ())):
                ids = groups.channel_components(value.name, axis)
                if ids is not None:
                    x[torch.from_numpy(ids), column] = 1
    x[channel_nodes:, 2] = 1
    x[:, 3] = torch.from_numpy(prunable_nodes(unit_of_node, groups).astype(np.float32))
    # depth: of the first weight producing the channel, else of the parameter a source node holds
    source, target = data.edge_index
    edge_depth = data.edge_attr[:, -1]
    kinds = data.edge_attr[:, 2 * EDGE_WIDTH : 2 * EDGE_WIDTH + len(EDGE_KINDS)].argmax(1)
    weights = kinds <= EDGE_KINDS.index("grouped_weight")
    unset = torch.full((nodes,), 2.0)
    produced = unset.scatter_reduce(0, target[weights], edge_depth[weights], reduce="amin")
    held = unset.scatter_reduce(0, source[~weights], edge_depth[~weights], reduce="amin")
    depth = torch.where(produced <= 1, produced, torch.where(held <= 1, held, torch.zeros(())))
    x[:, 4] = depth
    return x


def prunable_nodes(unit_of_node: np.ndarray, groups: DependencyGroups) -> np.ndarray:
    """Whether each node is a unit of a group that can lose units (none of a model with no units at all)."""
    mask = unit_of_node >= 0
    mask[mask] = groups.prunable_units()[unit_of_node[mask]]
    return mask


def _units_of_nodes(groups: DependencyGroups, num_nodes: int) -> np.ndarray:
    """The dependency-group unit of each channel node (-1: frozen channels and parameter sources)."""
    unit = np.full(num_nodes, -1, np.int64)
    for space_id, units in groups.space_units.items():
        ids = groups.channel_components(groups.spaces[space_id].value, groups.spaces[space_id].axis)
        present = units >= 0
        unit[ids[present]] = units[present]
    return unit
