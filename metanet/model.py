"""The metanetwork: a GNN on the channel graph that maps a network's weights to new weights.

Message passing over nodes (channels) and edges (weights), with edge updates, in the spirit of the neural
graph metanetworks Meta Pruning uses: each layer first updates every edge from its two end nodes and
itself, then every node from the mean of the edges coming in and the mean of the edges going out (kept
apart, since a channel's output kernels and its input kernels in the next layer mean different things).
Node and edge updates are residual. The output is a change to each edge's values, in the edge's
normalised units (`ChannelGraph` divides each parameter by its RMS), added to the input weights and
scaled back:

    new weights = weights + value_scale x value_mask x head(edge embedding)

The head is initialised to zero, so an untrained metanetwork is exactly the identity, and training starts
from the network as it was; the mask keeps padding slots at zero. Nothing depends on the graph's size, so
one metanetwork serves any network pcc can turn into a channel graph.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch_geometric.data import Data
from torch_geometric.nn import MessagePassing

from pcc.metanet.graph import EDGE_FEATURES, EDGE_WIDTH, NODE_FEATURES

__all__ = ["EdgeNodeLayer", "Metanetwork", "MetanetworkConfig"]


@dataclass(frozen=True)
class MetanetworkConfig:
    hidden: int = 32
    layers: int = 3

    def to_dict(self) -> dict:
        return asdict(self)


def _mlp(inputs: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inputs, hidden), nn.SiLU(), nn.Linear(hidden, hidden))


class EdgeNodeLayer(MessagePassing):
    """One round: edges from (source node, target node, edge), then nodes from (node, mean incoming edge,
    mean outgoing edge); both residual. The last layer of a metanetwork updates edges only: the head reads
    edges, so a node update there would be computed for nothing."""

    def __init__(self, hidden: int, update_nodes: bool = True) -> None:
        super().__init__(aggr="mean")
        self.edge_mlp = _mlp(3 * hidden, hidden)
        self.edge_norm = nn.LayerNorm(3 * hidden)
        self.node_mlp = _mlp(3 * hidden, hidden) if update_nodes else None
        self.node_norm = nn.LayerNorm(3 * hidden) if update_nodes else None

    def forward(self, nodes: torch.Tensor, edge_index: torch.Tensor, edges: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        source, target = edge_index
        edges = edges + self.edge_mlp(self.edge_norm(torch.cat([nodes[source], nodes[target], edges], dim=1)))
        if self.node_mlp is None:
            return nodes, edges
        incoming = self.propagate(edge_index, edges=edges, size=(nodes.size(0), nodes.size(0)))
        outgoing = self.propagate(edge_index.flip(0), edges=edges, size=(nodes.size(0), nodes.size(0)))
        nodes = nodes + self.node_mlp(self.node_norm(torch.cat([nodes, incoming, outgoing], dim=1)))
        return nodes, edges

    def message(self, edges: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return edges


class Metanetwork(nn.Module):
    """Channel graph in, new edge values [E, EDGE_WIDTH] out (identity when untrained)."""

    def __init__(self, config: MetanetworkConfig | None = None) -> None:
        super().__init__()
        self.config = config or MetanetworkConfig()
        hidden = self.config.hidden
        self.node_embed = nn.Linear(NODE_FEATURES, hidden)
        self.edge_embed = nn.Linear(EDGE_FEATURES, hidden)
        self.layers = nn.ModuleList(EdgeNodeLayer(hidden, update_nodes=i < self.config.layers - 1)
                                    for i in range(self.config.layers))
        self.head = nn.Linear(hidden, EDGE_WIDTH)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, data: Data) -> torch.Tensor:
        nodes, edges = self.node_embed(data.x), self.edge_embed(data.edge_attr)
        for layer in self.layers:
            nodes, edges = layer(nodes, data.edge_index, edges)
        return data.weight_values + data.value_scale * data.value_mask * self.head(edges)

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
