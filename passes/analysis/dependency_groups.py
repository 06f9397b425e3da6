"""Dependency groups: the channels that must be removed together, found on the ONNX graph.

Every axis of every tensor is a *space* of elements. Walking the graph once, each node's rule (see
`channel_rules`) links elements that are the same channel; connected components of that relation are
*units*: sets of (tensor, axis, index) that can only be removed all at once. A unit touching a model
input or output, a barrier, or an axis its rule could not map is frozen. A unit is prunable if it is not
frozen and owns some parameter slice (removing it saves something).

Units are then gathered into *groups* by the layer that produces them: units sharing a producer axis
(a conv's output channels, all convs feeding one residual sum) form one group, which is what
importance, allocation and `round_to` work on. Branches joined by a Concat stay separate groups.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from pcc.compiler.errors import UnresolvedShapeError, UnsupportedModelError
from pcc.passes.analysis.channel_rules import Dims, Role, rule_for
from pcc.passes.analysis.attention import AttentionBlocks
from pcc.passes.results import lookup, store

__all__ = [
    "Barrier",
    "ChannelSpace",
    "DependencyGroup",
    "DependencyGroups",
    "BuildDependencyGroups",
    "build_dependency_groups",
    "is_parameter",
    "connected_components",
]

_FLOAT_TYPES = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE}


@dataclass(frozen=True)
class Barrier:
    """A node whose op has no channel rule: channels through it are never pruned."""

    node: str
    op: str


@dataclass(frozen=True)
class ChannelSpace:
    """One axis of one tensor."""

    value: str
    axis: int
    size: int
    is_param: bool
    role: Role | None


@dataclass
class DependencyGroup:
    """Units removed by one allocation decision: they share a producing layer."""

    index: int
    unit_start: int  # the group's units are global unit ids [unit_start, unit_start + num_units)
    num_units: int
    channels_per_unit: int  # >1 for whole groups of a grouped conv
    unit_multiple: int  # kept units must be a multiple of this (from round_to)
    producers: list[str]
    consumers: list[str]
    space_ids: list[int]
    cross_channel_norm: bool  # some unit is normalised across channels (LayerNorm): masking != removal
    kind: str = "channels"  # "heads": each unit is one attention head (its Q/K/V/O slices); "width": normalised
    enabled: bool = True  # False: the user did not ask to prune this kind (`--prune`)

    @property
    def units(self) -> slice:
        return slice(self.unit_start, self.unit_start + self.num_units)

    @property
    def min_units(self) -> int:
        """Never prune a group to nothing; keep at least one round_to multiple (all of a disabled group)."""
        return min(self.num_units, self.unit_multiple) if self.enabled else self.num_units

    @property
    def prunable(self) -> bool:
        return self.num_units > self.min_units

    @property
    def name(self) -> str:
        names = self.producers or self.consumers
        return names[0] if names else f"group{self.index}"

    def __str__(self) -> str:
        extra = f" x{self.channels_per_unit}ch" if self.channels_per_unit > 1 else ""
        norm = ", width a LayerNorm normalises (--prune width)" if self.cross_channel_norm else ""
        more = f" (+{len(self.producers) - 1} more)" if len(self.producers) > 1 else ""
        off = "" if self.enabled else f" [not pruned: {self.kind} not selected]"
        units = "heads" if self.kind == "heads" else "units"
        return f"group {self.index}: {self.num_units} {units}{extra} from {self.name}{more}{norm}{off}"


@dataclass
class DependencyGroups:
    """The result of `BuildDependencyGroups`: spaces, units, groups and barriers of one model."""

    META_KEY = "pcc.dependency_groups"
    PRODUCED_BY = "BuildDependencyGroups"

    spaces: list[ChannelSpace]
    space_units: dict[int, np.ndarray]  # space id -> unit id of each element (-1: not prunable)
    groups: list[DependencyGroup]
    barriers: list[Barrier]
    num_units: int
    total_params: int
    prunable_params: int
    round_to: int
    # connected component of every element of every space (frozen ones too), spaces laid end to end from
    # `space_offsets`: which channels are one channel, for views of the model as a graph of channels
    components: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64), repr=False)
    space_offsets: list[int] = field(default_factory=list, repr=False)
    _space_index: dict[tuple[str, int], int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._space_index = {(s.value, s.axis): i for i, s in enumerate(self.spaces)}

    def space_id(self, value: str, axis: int) -> int | None:
        return self._space_index.get((value, axis))

    def channel_components(self, value: str, axis: int) -> np.ndarray | None:
        """The component id of each element along `axis` of `value` (equal ids: one channel), if recorded."""
        space = self.space_id(value, axis)
        if space is None:
            return None
        start = self.space_offsets[space]
        return self.components[start : start + self.spaces[space].size]

    @property
    def prunable_fraction(self) -> float:
        return self.prunable_params / self.total_params if self.total_params else 0.0

    def prunable_units(self) -> np.ndarray:
        """Whether each unit belongs to a group that can lose units at all."""
        mask = np.zeros(self.num_units, dtype=bool)
        for group in self.groups:
            mask[group.units] = group.prunable
        return mask

    def unit_group(self) -> np.ndarray:
        """Group index of every unit."""
        owner = np.empty(self.num_units, dtype=np.int64)
        for group in self.groups:
            owner[group.units] = group.index
        return owner

    def kept_indices(self, removed: np.ndarray) -> dict[tuple[str, int], np.ndarray]:
        """For every (tensor, axis) that loses elements, the original indices that stay."""
        kept = {}
        for space_id, units in self.space_units.items():
            gone = (units >= 0) & removed[np.maximum(units, 0)]
            if gone.any():
                space = self.spaces[space_id]
                kept[(space.value, space.axis)] = np.flatnonzero(~gone)
        return kept

    def summary(self) -> str:
        prunable = sum(g.prunable for g in self.groups)
        return (
            f"{len(self.groups)} groups ({prunable} prunable), {self.num_units} units, "
            f"{len(self.barriers)} barriers, prunable params {self.prunable_params}/{self.total_params} "
            f"({100 * self.prunable_fraction:.1f}%)"
        )


def is_parameter(value: ir.Value) -> bool:
    """A weight: a floating-point initializer that no caller can override."""
    return (
        value.is_initializer()
        and not value.is_graph_input()
        and value.const_value is not None
        and value.const_value.dtype in _FLOAT_TYPES
    )


def connected_components(num_nodes: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Label every node with the smallest node id of its component (edges a[i] -- b[i]).

    Vectorised union-find: hook each root onto the smallest root it touches, then jump pointers until
    every node points at a root; a handful of rounds even for long chains.
    """
    parent = np.arange(num_nodes)
    while True:
        root_a, root_b = parent[a], parent[b]
        differ = root_a != root_b
        if not differ.any():
            return parent
        low = np.minimum(root_a[differ], root_b[differ])
        high = np.maximum(root_a[differ], root_b[differ])
        np.minimum.at(parent, high, low)
        while True:
            jumped = parent[parent]
            if np.array_equal(jumped, parent):
                break
            parent = jumped


class _Recorder:
    """The `ChannelContext` rules talk to: it numbers elements and records links and constraints."""

    def __init__(self) -> None:
        self.space_keys: dict[tuple[ir.Value, int], int] = {}
        self.space_values: list[ir.Value] = []
        self.space_axes: list[int] = []
        self.space_sizes: list[int] = []
        self.space_offsets: list[int] = []
        self.num_elements = 0
        self.edges_a: list[np.ndarray] = []
        self.edges_b: list[np.ndarray] = []
        self.frozen: list[np.ndarray] = []
        self.normalised_ids: list[np.ndarray] = []
        self.roles: dict[int, Role] = {}
        self._touched: set[tuple[ir.Value, int]] = set()
        self._node: ir.Node | None = None

    # -- what rules call ---------------------------------------------------------------------

    def shape(self, value: ir.Value) -> Dims:
        shape = value.shape
        if shape is None and value.const_value is not None:
            shape = value.const_value.shape
        if shape is None:
            where = f" (used by {self._node.op_type} node '{self._node.name}')" if self._node else ""
            raise UnresolvedShapeError(
                f"cannot resolve the shape of value '{value.name}'{where}; "
                "export the model with static input shapes"
            )
        return tuple(d if isinstance(d, int) else None for d in shape)

    def const(self, value: ir.Value | None) -> np.ndarray | None:
        if value is None or value.const_value is None:
            return None
        return value.const_value.numpy()

    def link(self, a, a_axis, b, b_axis, a_index=None, b_index=None) -> None:
        a_axis, b_axis = self._axis(a, a_axis), self._axis(b, b_axis)
        size_a, size_b = self.shape(a)[a_axis], self.shape(b)[b_axis]
        self._touched.update(((a, a_axis), (b, b_axis)))
        if size_a is None or size_b is None:
            if size_a is None and size_b is None:
                return  # symbolic dims are never pruned
            symbolic = a if size_a is None else b
            raise UnresolvedShapeError(
                f"cannot resolve a channel dimension of value '{symbolic.name}' "
                f"({self._node.op_type} node '{self._node.name}'); export the model with static shapes"
            )
        if a_index is None and b_index is None and size_a != size_b:
            raise UnsupportedModelError(
                f"{self._node.op_type} node '{self._node.name}': '{a.name}' axis {a_axis} has {size_a} "
                f"elements but '{b.name}' axis {b_axis} has {size_b}; the model's shapes are inconsistent"
            )
        ids_a = self._ids(a, a_axis, a_index)
        ids_b = self._ids(b, b_axis, b_index)
        self.edges_a.append(ids_a)
        self.edges_b.append(ids_b)

    def accept(self, value: ir.Value, axis: int | None = None) -> None:
        axes = range(len(self.shape(value))) if axis is None else [self._axis(value, axis)]
        for a in axes:
            self._touched.add((value, a))

    def freeze(self, value: ir.Value, axis: int, index: np.ndarray | None = None) -> None:
        axis = self._axis(value, axis)
        self._touched.add((value, axis))
        if self.shape(value)[axis] is not None:
            self.frozen.append(self._ids(value, axis, index))

    def role(self, value: ir.Value, axis: int, role: Role) -> None:
        axis = self._axis(value, axis)
        if is_parameter(value) and self.shape(value)[axis] is not None:
            self.roles.setdefault(self._space(value, axis), role)

    def normalised(self, value: ir.Value, axis: int) -> None:
        axis = self._axis(value, axis)
        if self.shape(value)[axis] is not None:
            self.normalised_ids.append(self._ids(value, axis, None))

    # -- what the builder calls -------------------------------------------------------------

    def begin(self, node: ir.Node) -> None:
        self._node = node
        self._touched = set()

    def freeze_untouched(self, values) -> None:
        """Every axis the rule did not explicitly handle is frozen: pcc never guesses."""
        for value in values:
            if value is None or (value.shape is None and value.const_value is None):
                continue
            for axis, size in enumerate(self.shape(value)):
                if size is not None and (value, axis) not in self._touched:
                    self.frozen.append(self._ids(value, axis, None))

    def freeze_all(self, value: ir.Value) -> None:
        self._touched = set()
        self.freeze_untouched([value])

    # -- internals ---------------------------------------------------------------------------

    def _axis(self, value: ir.Value, axis: int) -> int:
        rank = len(self.shape(value))
        if not -rank <= axis < rank:
            raise UnsupportedModelError(
                f"{self._node.op_type} node '{self._node.name}': axis {axis} is out of range for "
                f"'{value.name}' of rank {rank}"
            )
        return axis + rank if axis < 0 else axis

    def _space(self, value: ir.Value, axis: int) -> int:
        key = (value, axis)
        space = self.space_keys.get(key)
        if space is None:
            space = len(self.space_values)
            self.space_keys[key] = space
            size = self.shape(value)[axis]
            self.space_values.append(value)
            self.space_axes.append(axis)
            self.space_sizes.append(size)
            self.space_offsets.append(self.num_elements)
            self.num_elements += size
        return space

    def _ids(self, value: ir.Value, axis: int, index: np.ndarray | None) -> np.ndarray:
        space = self._space(value, axis)
        size = self.space_sizes[space]
        if index is None:
            index = np.arange(size)
        index = np.asarray(index, dtype=np.int64).ravel()
        if index.size and (index.min() < 0 or index.max() >= size):
            raise UnsupportedModelError(
                f"{self._node.op_type} node '{self._node.name}': index out of range for '{value.name}' "
                f"axis {axis} (size {size})"
            )
        return self.space_offsets[space] + index


def build_dependency_groups(
    graph: ir.Graph,
    round_to: int = 1,
    head_weights: frozenset[str] = frozenset(),
    kinds: tuple[str, ...] = ("channels",),
) -> DependencyGroups:
    """Run every node's channel rule and assemble units and groups (see the module docstring).

    Groups produced by one of `head_weights` (attention Q/K/V projections) are of kind "heads"; only
    groups whose kind is in `kinds` may lose units.
    """
    if round_to < 1:
        raise ValueError("round_to must be >= 1")
    recorder = _Recorder()
    barriers = []
    for node in graph:
        rule = rule_for(node)
        recorder.begin(node)
        if rule is None:
            barriers.append(Barrier(node=node.name, op=node.op_type if not node.domain else f"{node.domain}::{node.op_type}"))
        else:
            rule.propagate(recorder, node)
        recorder.freeze_untouched(list(node.inputs) + list(node.outputs))
    _freeze_outer_values_of_subgraphs(graph, recorder)
    for value in list(graph.inputs) + list(graph.outputs):
        recorder.freeze_all(value)  # the model's interface is never pruned
    return _assemble(graph, recorder, barriers, round_to, head_weights, kinds)


def _freeze_outer_values_of_subgraphs(graph: ir.Graph, recorder: _Recorder) -> None:
    # If/Loop/Scan bodies may read outer tensors without listing them as node inputs; those tensors'
    # channels are consumed by code pcc does not analyse.
    for node in graph.all_nodes():
        if node.graph is graph:
            continue
        for value in node.inputs:
            if value is not None and value.graph is graph:
                recorder.freeze_all(value)


def _assemble(
    graph: ir.Graph, rec: _Recorder, barriers: list[Barrier], round_to: int, head_weights: frozenset[str],
    kinds: tuple[str, ...],
) -> DependencyGroups:
    labels = connected_components(
        rec.num_elements,
        np.concatenate(rec.edges_a) if rec.edges_a else np.empty(0, np.int64),
        np.concatenate(rec.edges_b) if rec.edges_b else np.empty(0, np.int64),
    )
    frozen_roots = np.unique(labels[np.concatenate(rec.frozen)]) if rec.frozen else np.empty(0, np.int64)
    param_spaces = [s for s, v in enumerate(rec.space_values) if is_parameter(v)]
    param_roots = np.unique(
        np.concatenate([labels[_span(rec, s)] for s in param_spaces]) if param_spaces else np.empty(0, np.int64)
    )
    unit_roots = np.setdiff1d(param_roots, frozen_roots, assume_unique=True)

    # unit id of every element (-1: not prunable); only spaces that hold some unit are kept
    unit_of_root = np.full(rec.num_elements, -1, dtype=np.int64)
    unit_of_root[unit_roots] = np.arange(len(unit_roots))
    unit_of_element = unit_of_root[labels]
    space_units: dict[int, np.ndarray] = {}
    for space in range(len(rec.space_values)):
        units = unit_of_element[_span(rec, space)]
        if (units >= 0).any():
            space_units[space] = units

    # renumber units so that each group's units are contiguous
    group_of_unit = _group_units(len(unit_roots), space_units, rec)
    order = np.argsort(group_of_unit, kind="stable")
    new_id = np.empty_like(order)
    new_id[order] = np.arange(len(order))
    for space, units in space_units.items():
        space_units[space] = np.where(units >= 0, new_id[np.maximum(units, 0)], -1)

    normalised = unit_of_element[np.concatenate(rec.normalised_ids)] if rec.normalised_ids else np.empty(0, np.int64)
    normalised_units = new_id[np.unique(normalised[normalised >= 0])]
    groups = _describe_groups(group_of_unit[order], space_units, rec, normalised_units, round_to)
    for group in groups:
        if head_weights.intersection(group.producers):
            group.kind = "heads"
            # round_to asks for SIMD-friendly widths; a head keeps its own width whole, so any head count is one
            # (rounding 16 heads of width 15 to multiples of 8 channels would allow only 8 or 16 heads)
            group.unit_multiple = 1
        else:  # a width LayerNorm normalises (a transformer's hidden size) is asked for by name, see GROUP_KINDS
            group.kind = "width" if group.cross_channel_norm else "channels"
        group.enabled = group.kind in kinds

    spaces = [
        ChannelSpace(
            value=rec.space_values[s].name,
            axis=rec.space_axes[s],
            size=rec.space_sizes[s],
            is_param=is_parameter(rec.space_values[s]),
            role=rec.roles.get(s),
        )
        for s in range(len(rec.space_values))
    ]
    total, prunable = _count_params(graph, rec, space_units, groups)
    return DependencyGroups(
        spaces=spaces,
        space_units=space_units,
        groups=groups,
        barriers=barriers,
        num_units=len(unit_roots),
        total_params=total,
        prunable_params=prunable,
        round_to=round_to,
        components=np.unique(labels, return_inverse=True)[1].reshape(-1),
        space_offsets=list(rec.space_offsets),
    )


def _span(rec: _Recorder, space: int) -> slice:
    return slice(rec.space_offsets[space], rec.space_offsets[space] + rec.space_sizes[space])


def _group_units(num_units: int, space_units: dict[int, np.ndarray], rec: _Recorder) -> np.ndarray:
    """Units sharing a producer axis form one group; producer-less units group by any shared weight."""
    has_producer = np.zeros(num_units, dtype=bool)
    producer_sets, other_sets = [], []
    for space, units in space_units.items():
        if not is_parameter(rec.space_values[space]):
            continue
        present = np.unique(units[units >= 0])
        if rec.roles.get(space) is Role.OUT:
            has_producer[present] = True
            producer_sets.append(present)
        else:
            other_sets.append(present)
    edges_a, edges_b = [], []
    for present in producer_sets:
        edges_a.append(present[:-1])
        edges_b.append(present[1:])
    for present in other_sets:
        orphans = present[~has_producer[present]]
        edges_a.append(orphans[:-1])
        edges_b.append(orphans[1:])
    labels = connected_components(
        num_units,
        np.concatenate(edges_a) if edges_a else np.empty(0, np.int64),
        np.concatenate(edges_b) if edges_b else np.empty(0, np.int64),
    )
    _, dense = np.unique(labels, return_inverse=True)
    return dense


def _describe_groups(
    unit_group: np.ndarray,
    space_units: dict[int, np.ndarray],
    rec: _Recorder,
    normalised_units: np.ndarray,
    round_to: int,
) -> list[DependencyGroup]:
    num_groups = int(unit_group.max()) + 1 if len(unit_group) else 0
    starts = np.searchsorted(unit_group, np.arange(num_groups))
    counts = np.bincount(unit_group, minlength=num_groups)
    producers: list[list[str]] = [[] for _ in range(num_groups)]
    consumers: list[list[str]] = [[] for _ in range(num_groups)]
    group_spaces: list[list[int]] = [[] for _ in range(num_groups)]
    channels_per_unit = np.ones(num_groups, dtype=np.int64)
    for space, units in space_units.items():
        valid = units[units >= 0]
        owners = np.unique(unit_group[valid])
        value = rec.space_values[space]
        role = rec.roles.get(space)
        for g in owners:
            group_spaces[g].append(space)
            if role is Role.OUT and value.name not in producers[g]:
                producers[g].append(value.name)
                mine = valid[unit_group[valid] == g]
                channels_per_unit[g] = max(channels_per_unit[g], int(np.bincount(mine - starts[g]).max()))
            elif role is Role.IN and value.name not in consumers[g]:
                consumers[g].append(value.name)
    normalised_groups = set(unit_group[normalised_units].tolist()) if len(normalised_units) else set()
    groups = []
    for g in range(num_groups):
        per_unit = int(channels_per_unit[g])
        groups.append(
            DependencyGroup(
                index=g,
                unit_start=int(starts[g]),
                num_units=int(counts[g]),
                channels_per_unit=per_unit,
                unit_multiple=round_to // math.gcd(round_to, per_unit),
                producers=producers[g],
                consumers=consumers[g],
                space_ids=group_spaces[g],
                cross_channel_norm=g in normalised_groups,
            )
        )
    return groups


def _count_params(
    graph: ir.Graph, rec: _Recorder, space_units: dict[int, np.ndarray], groups: list[DependencyGroup]
) -> tuple[int, int]:
    """All weight elements, and those of weights with an axis that can actually lose units."""
    can_lose = np.zeros(sum(g.num_units for g in groups), dtype=bool)
    for group in groups:
        can_lose[group.units] = group.prunable
    prunable_values = {
        rec.space_values[s]
        for s, units in space_units.items()
        if is_parameter(rec.space_values[s]) and can_lose[units[units >= 0]].any()
    }
    total = prunable = 0
    for value in graph.initializers.values():
        if is_parameter(value):
            size = value.const_value.size
            total += size
            if value in prunable_values:
                prunable += size
    return total, prunable


@dataclass
class BuildDependencyGroups(ir.passes.InPlacePass):
    """Analysis: find the channels that must be removed together (stores `DependencyGroups`).

    `round_to` makes every group keep a multiple of that many channels (e.g. 8 for SIMD-friendly
    widths); grouped and depthwise convolutions always keep whole groups. `prune` names the kinds of
    group that may lose units: "channels", and "heads" (groups of attention heads, recognised when
    `FindAttentionBlocks` ran first).
    """

    round_to: int = 1
    prune: tuple[str, ...] = ("channels",)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        attention = lookup(model, AttentionBlocks)
        head_weights = frozenset(w for block in attention.blocks for w in block.weights) if attention else frozenset()
        store(model, build_dependency_groups(model.graph, self.round_to, head_weights, tuple(self.prune)))
        return ir.passes.PassResult(model, modified=False)
