"""Regions: the part of a graph that pruning one group (or factorising one weight) can change.

Pruning a group changes only the nodes that read or write its tensors and whatever depends on them;
everything upstream computes what the base model computes. So a variant can run as a sub-model of just
that part, fed the activations entering it, which saves re-running the rest of the network:

- `downstream_region`: the nodes touching the values and every node after them. Its outputs are graph
  outputs, so the sensitivity sweep measures output distortion on it.
- `local_region`: only the nodes touching the values. Every activation leaving it has the same shape in
  the dense and the pruned model, so the latency table times a group's change on it alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass

import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from pcc.passes.analysis.dependency_groups import DependencyGroup, DependencyGroups

__all__ = [
    "Region", "downstream_region", "group_values", "local_region", "region_groups", "region_model",
    "session_with_region_inputs",
]


@dataclass(frozen=True)
class Region:
    """Node positions in a graph, the activations entering them (graph inputs included), and the values
    they compute that the rest of the graph (or its outputs) reads."""

    nodes: frozenset[int]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


def _has_subgraphs(nodes: list[ir.Node]) -> bool:
    return any(attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for n in nodes for attr in n.attributes.values())


def _whole(graph: ir.Graph) -> Region:
    """Graphs with subgraphs (If, Loop) are taken whole: their bodies read outer values."""
    return Region(frozenset(range(len(graph))), tuple(v.name for v in graph.inputs), tuple(v.name for v in graph.outputs))


def _touches(node: ir.Node, values: set[str], produced: set[int]) -> bool:
    reads = [v for v in node.inputs if v is not None]
    return any(v.name in values or id(v) in produced for v in reads) or any(
        v is not None and v.name in values for v in node.outputs
    )


def downstream_region(graph: ir.Graph, values: set[str]) -> Region:
    """Nodes that read or write any of `values` (a group's tensors), and every node after them that
    depends on one; its outputs are the graph outputs it computes."""
    nodes = list(graph)
    if _has_subgraphs(nodes):
        return _whole(graph)
    inside: set[int] = set()
    produced: set[int] = set()  # ids of values computed inside
    for position, node in enumerate(nodes):
        if _touches(node, values, produced):
            inside.add(position)
            produced.update(id(v) for v in node.outputs if v is not None)
    entering = _entering(nodes, inside, produced)
    return Region(frozenset(inside), entering, tuple(v.name for v in graph.outputs if id(v) in produced))


def local_region(graph: ir.Graph, values: set[str]) -> Region:
    """Only the nodes that read or write any of `values`; its outputs are the values those nodes compute
    that a node outside (or a graph output) reads."""
    nodes = list(graph)
    if _has_subgraphs(nodes):
        return _whole(graph)
    inside = {position for position, node in enumerate(nodes) if _touches(node, values, set())}
    produced = {id(v) for position in inside for v in nodes[position].outputs if v is not None}
    entering = _entering(nodes, inside, produced)  # may pull in Constant nodes
    outside = [node for position, node in enumerate(nodes) if position not in inside]
    read_outside = {id(v) for node in outside for v in node.inputs if v is not None} | {id(v) for v in graph.outputs}
    leaving = [
        v.name for position in sorted(inside) for v in nodes[position].outputs
        if v is not None and id(v) in read_outside
    ]
    return Region(frozenset(inside), entering, tuple(leaving))


def _entering(nodes: list[ir.Node], inside: set[int], produced: set[int]) -> tuple[str, ...]:
    """The activations `inside` reads and does not compute; a Constant feeding it joins it (changes `inside`)."""
    position_of = {id(node): position for position, node in enumerate(nodes)}
    entering: dict[str, None] = {}
    for position in sorted(inside):
        for value in nodes[position].inputs:
            if value is None or id(value) in produced or value.is_initializer():
                continue
            producer = value.producer()
            if producer is not None and producer.op_type == "Constant":
                inside.add(position_of[id(producer)])  # a constant is cheaper to keep than to feed
            else:
                entering[value.name] = None
    return tuple(entering)


def region_model(model: ir.Model, region: Region) -> ir.Model:
    """A copy of `model` holding only the region's nodes, with its entering activations as inputs."""
    copy = model.clone()
    graph = copy.graph
    nodes = list(graph)
    by_name = {v.name: v for v in graph.inputs} | {v.name: v for n in nodes for v in n.outputs if v is not None}
    inputs = []
    for name in region.inputs:
        old = by_name[name]
        if not old.is_graph_input():
            new = ir.Value(shape=old.shape, type=old.type)
            ir.convenience.replace_all_uses_with(old, new)
            old.name, new.name = f"{name}__upstream", name
            old = new
        inputs.append(old)
    outputs = [by_name[name] for name in region.outputs]
    graph.outputs.clear()
    graph.inputs.clear()
    graph.remove([node for position, node in enumerate(nodes) if position not in region.nodes], safe=False)
    graph.inputs.extend(inputs)
    graph.outputs.extend(outputs)
    common_passes.RemoveUnusedNodesPass()(copy)
    return copy


def group_values(groups: DependencyGroups, group: DependencyGroup) -> set[str]:
    return {groups.spaces[space].value for space in group.space_ids}


def region_groups(groups: DependencyGroups, region: ir.Model) -> DependencyGroups:
    """`groups` restricted to the tensors a region model holds, so `prune_channels` can prune it with the
    whole model's removal masks."""
    names = {v.name for v in region.graph.inputs} | set(region.graph.initializers)
    names |= {v.name for node in region.graph for v in node.outputs if v is not None}
    local = {space: units for space, units in groups.space_units.items() if groups.spaces[space].value in names}
    return dataclasses.replace(groups, space_units=local)


def session_with_region_inputs(model: ir.Model, regions: Iterable[Region], threads: int | None = None):
    """An onnxruntime session of `model` (changed here: pass a copy) that also outputs every region's
    entering activations that the graph computes, and their names (graph inputs are the caller's feeds)."""
    from pcc.backends.onnx.runtime import session

    values = {v.name: v for node in model.graph for v in node.outputs if v is not None}
    wanted = sorted({name for region in regions for name in region.inputs if name in values})
    model.graph.outputs.extend(values[name] for name in wanted if not values[name].is_graph_output())
    return session(ir.serde.serialize_model(model).SerializeToString(), threads=threads), wanted
