"""How channels flow through each ONNX op: one entry per op type, in one table.

A *space* is one axis of one tensor. A rule tells the `ChannelContext` which elements of which spaces
are the same channel (`link`), which spaces it leaves unconstrained (`accept`), which parameter axes
produce or consume channels (`role`) and which axes are normalised across (`normalised`). Every axis of
a node's inputs and outputs that its rule neither links nor accepts is frozen: pcc never guesses. An op
with no entry here is a *barrier*; all its axes are frozen and `pcc inspect` lists it. Torch-Pruning
treats unknown ops as element-wise, which silently builds wrong groups; this table is the alternative.

Links are element-level (index arrays), so concatenation offsets, split ranges, channel blocks of
Flatten/Reshape, depth-to-space orderings and grouped convolutions are all the same mechanism.

Rules that encode channel counts in attributes or constant inputs also have a `rewrite`, applied by
`PruneChannels` once the kept channels are known.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import onnx_ir as ir

__all__ = [
    "Role",
    "ChannelContext",
    "RewriteContext",
    "OpRule",
    "CHANNEL_RULES",
    "SHAPE_PRESERVING_OPS",
    "rule_for",
    "reshape_factors",
]

Dims = tuple[int | None, ...]  # None marks a symbolic dimension


class Role(enum.Enum):
    """What a parameter axis means for the channels it carries."""

    OUT = "out"  # a producer: the layer computes these channels (conv/linear output axis)
    IN = "in"  # a consumer: the layer reads these channels (conv/linear input axis)
    SCALE = "scale"  # a per-channel multiplier (layer scale, PRelu slope)
    NORM_SCALE = "norm_scale"  # a normalisation gamma (BatchNorm, LayerNorm, GroupNorm, InstanceNorm)
    SHIFT = "shift"  # a per-channel additive term or statistic (bias, BN beta/mean/var)


class ChannelContext(Protocol):
    """What a rule may ask and say about one node; implemented by the dependency-group builder."""

    def shape(self, value: ir.Value) -> Dims: ...

    def const(self, value: ir.Value | None) -> np.ndarray | None: ...

    def link(
        self,
        a: ir.Value,
        a_axis: int,
        b: ir.Value,
        b_axis: int,
        a_index: np.ndarray | None = None,
        b_index: np.ndarray | None = None,
    ) -> None: ...

    def accept(self, value: ir.Value, axis: int | None = None) -> None: ...

    def freeze(self, value: ir.Value, axis: int, index: np.ndarray | None = None) -> None: ...

    def role(self, value: ir.Value, axis: int, role: Role) -> None: ...

    def normalised(self, value: ir.Value, axis: int) -> None: ...


class RewriteContext(Protocol):
    """What a rewrite may ask while `PruneChannels` applies an allocation."""

    def kept(self, value: ir.Value, axis: int) -> np.ndarray | None:
        """Original indices kept along this axis, or None where nothing was removed."""
        ...

    def const(self, value: ir.Value | None) -> np.ndarray | None: ...

    def replace_input(self, node: ir.Node, index: int, array: np.ndarray) -> None:
        """Point input `index` of `node` at a new constant (never edit a possibly shared one)."""
        ...


@dataclass(frozen=True)
class OpRule:
    propagate: Callable[[ChannelContext, ir.Node], None]
    rewrite: Callable[[RewriteContext, ir.Node], None] | None = None


# ----------------------------------------------------------------------------------------------
# helpers


def _inputs(node: ir.Node) -> list[ir.Value]:
    return [v for v in node.inputs if v is not None]


def _attr_int(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return default if attr is None else int(attr.value)


def _attr_ints(node: ir.Node, name: str) -> list[int] | None:
    attr = node.attributes.get(name)
    return None if attr is None else [int(v) for v in attr.value]


def _input(node: ir.Node, index: int) -> ir.Value | None:
    return node.inputs[index] if len(node.inputs) > index else None


def _norm_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _identity(ctx: ChannelContext, a: ir.Value, b: ir.Value, axes: Sequence[int] | None = None) -> None:
    """Same axis, same channels. Where inference knows the size on one side only (a spatial axis that a
    later input of a Concat fixes), the elements cannot be paired: that axis is left to be frozen."""
    a_dims, b_dims = ctx.shape(a), ctx.shape(b)
    for axis in range(len(a_dims)) if axes is None else axes:
        if (a_dims[axis] is None) == (b_dims[axis] is None):
            ctx.link(a, axis, b, axis)


def _accept_all(ctx: ChannelContext, values: Sequence[ir.Value | None]) -> None:
    for value in values:
        if value is not None:
            ctx.accept(value)


def _broadcast_into(
    ctx: ChannelContext, inputs: Sequence[ir.Value], output: ir.Value, param_role: Role | None
) -> None:
    """Numpy broadcasting: equal dims are the same channels; size-1 dims are unconstrained."""
    out_dims = ctx.shape(output)
    for value in inputs:
        dims = ctx.shape(value)
        offset = len(out_dims) - len(dims)
        for axis, dim in enumerate(dims):
            out_dim = out_dims[offset + axis]
            if dim == out_dim:
                ctx.link(value, axis, output, offset + axis)
                if param_role is not None and dim != 1:
                    ctx.role(value, axis, param_role)
            elif dim == 1:
                ctx.accept(value, axis)
            # anything else (symbolic vs concrete) stays frozen


def _axes_from(node: ir.Node, ctx: ChannelContext, input_index: int) -> list[int] | None:
    """Axes given as an attribute (older opsets) or as a constant input (newer ones)."""
    attr = _attr_ints(node, "axes")
    if attr is not None:
        return attr
    axes = ctx.const(_input(node, input_index))
    return None if axes is None else [int(a) for a in np.atleast_1d(axes)]


# ----------------------------------------------------------------------------------------------
# element-wise


def _unary(ctx: ChannelContext, node: ir.Node) -> None:
    """One data input mirrored by every output (activations, Cast, Dropout and its mask...)."""
    data = node.inputs[0]
    for out in node.outputs:
        _identity(ctx, data, out)
    _accept_all(ctx, node.inputs[1:])  # scalar extras: Clip bounds, Dropout ratio, CastLike target


def _broadcasting(param_role: Role | None) -> Callable[[ChannelContext, ir.Node], None]:
    def rule(ctx: ChannelContext, node: ir.Node) -> None:
        _broadcast_into(ctx, _inputs(node), node.outputs[0], param_role)

    return rule


# ----------------------------------------------------------------------------------------------
# layers with weights


def _block_leaders(count: int, block: int, leader_stride: int) -> np.ndarray:
    """Index of the first element of each element's block, in a space whose blocks are `leader_stride`."""
    return (np.arange(count) // block) * leader_stride


def _conv(ctx: ChannelContext, node: ir.Node) -> None:
    x, w = node.inputs[0], node.inputs[1]
    bias, y = _input(node, 2), node.outputs[0]
    in_channels, out_channels = ctx.shape(x)[1], ctx.shape(w)[0]
    group = _attr_int(node, "group", 1)
    ctx.link(x, 0, y, 0)
    if group == 1:
        ctx.link(x, 1, w, 1)
        ctx.role(w, 1, Role.IN)
    elif in_channels is not None and out_channels is not None:
        # Grouped and depthwise: a unit is one whole group (its inputs and outputs). Removing whole
        # groups keeps every remaining group's wiring intact; the `group` attribute is rewritten.
        in_per_group, out_per_group = in_channels // group, out_channels // group
        ctx.link(x, 1, w, 0, np.arange(in_channels), _block_leaders(in_channels, in_per_group, out_per_group))
        ctx.link(w, 0, w, 0, np.arange(out_channels), _block_leaders(out_channels, out_per_group, out_per_group))
    ctx.link(w, 0, y, 1)
    ctx.role(w, 0, Role.OUT)
    if bias is not None:
        ctx.link(bias, 0, y, 1)
        ctx.role(bias, 0, Role.SHIFT)


def _rewrite_group(channel_input: int, group_attr: str, input_axis: int = 1) -> Callable[[RewriteContext, ir.Node], None]:
    """Scale a group-count attribute by the fraction of whole groups kept."""

    def rewrite(ctx: RewriteContext, node: ir.Node) -> None:
        groups = _attr_int(node, group_attr, 1)
        source = node.inputs[channel_input]
        kept = ctx.kept(source, input_axis)
        if groups == 1 or kept is None:
            return
        channels = source.shape[input_axis]
        node.attributes[group_attr] = ir.AttrInt64(group_attr, groups * len(kept) // channels)

    return rewrite


def _conv_transpose(ctx: ChannelContext, node: ir.Node) -> None:
    x, w = node.inputs[0], node.inputs[1]
    bias, y = _input(node, 2), node.outputs[0]
    group = _attr_int(node, "group", 1)
    in_channels, out_per_group = ctx.shape(w)[0], ctx.shape(w)[1]
    ctx.link(x, 0, y, 0)
    ctx.link(x, 1, w, 0)
    if group == 1:
        ctx.role(w, 0, Role.IN)
        ctx.link(w, 1, y, 1)
        ctx.role(w, 1, Role.OUT)
    elif in_channels is not None and out_per_group is not None:
        in_per_group = in_channels // group
        out_channels = out_per_group * group
        ctx.link(w, 0, w, 0, np.arange(in_channels), _block_leaders(in_channels, in_per_group, in_per_group))
        ctx.link(y, 1, w, 0, np.arange(out_channels), _block_leaders(out_channels, out_per_group, in_per_group))
        ctx.role(w, 0, Role.OUT)
    if bias is not None:
        ctx.link(bias, 0, y, 1)
        ctx.role(bias, 0, Role.SHIFT)


def _gemm(ctx: ChannelContext, node: ir.Node) -> None:
    a, b, y = node.inputs[0], node.inputs[1], node.outputs[0]
    a_m, a_k = (1, 0) if _attr_int(node, "transA", 0) else (0, 1)
    b_k, b_n = (1, 0) if _attr_int(node, "transB", 0) else (0, 1)
    ctx.link(a, a_m, y, 0)
    ctx.link(a, a_k, b, b_k)
    ctx.link(b, b_n, y, 1)
    ctx.role(b, b_k, Role.IN)
    ctx.role(b, b_n, Role.OUT)
    ctx.role(a, a_k, Role.IN)
    ctx.role(a, a_m, Role.OUT)
    c = _input(node, 2)
    if c is not None:
        _broadcast_into(ctx, [c], y, Role.SHIFT)


def _matmul(ctx: ChannelContext, node: ir.Node) -> None:
    a, b, y = node.inputs[0], node.inputs[1], node.outputs[0]
    a_rank, b_rank, y_rank = len(ctx.shape(a)), len(ctx.shape(b)), len(ctx.shape(y))
    if a_rank < 2 or b_rank < 2:
        return  # vector products: rare in the networks pcc prunes; leave frozen
    ctx.link(a, a_rank - 1, b, b_rank - 2)
    ctx.link(a, a_rank - 2, y, y_rank - 2)
    ctx.link(b, b_rank - 1, y, y_rank - 1)
    ctx.role(b, b_rank - 2, Role.IN)
    ctx.role(b, b_rank - 1, Role.OUT)
    ctx.role(a, a_rank - 1, Role.IN)
    ctx.role(a, a_rank - 2, Role.OUT)
    out_batch = ctx.shape(y)[:-2]
    for value, rank in ((a, a_rank), (b, b_rank)):
        batch = ctx.shape(value)[: rank - 2]
        offset = len(out_batch) - len(batch)
        for axis, dim in enumerate(batch):
            if dim == out_batch[offset + axis]:
                ctx.link(value, axis, y, offset + axis)
            elif dim == 1:
                ctx.accept(value, axis)


# ----------------------------------------------------------------------------------------------
# normalisation


def _batch_norm(ctx: ChannelContext, node: ir.Node) -> None:
    x, y = node.inputs[0], node.outputs[0]
    _identity(ctx, x, y)
    roles = (Role.NORM_SCALE, Role.SHIFT, Role.SHIFT, Role.SHIFT)
    for param, role in zip(node.inputs[1:5], roles):
        ctx.link(param, 0, x, 1)
        ctx.role(param, 0, role)
    for stat in node.outputs[1:]:  # running mean/var in training mode
        ctx.link(stat, 0, x, 1)


def _instance_norm(ctx: ChannelContext, node: ir.Node) -> None:
    x, scale, bias, y = node.inputs[0], node.inputs[1], node.inputs[2], node.outputs[0]
    _identity(ctx, x, y, axes=(0, 1))  # spatial axes are normalised over: frozen
    ctx.link(scale, 0, x, 1)
    ctx.role(scale, 0, Role.NORM_SCALE)
    ctx.link(bias, 0, x, 1)
    ctx.role(bias, 0, Role.SHIFT)


def _layer_norm(ctx: ChannelContext, node: ir.Node) -> None:
    x, y = node.inputs[0], node.outputs[0]
    dims = ctx.shape(x)
    first = _norm_axis(_attr_int(node, "axis", -1), len(dims))
    _identity(ctx, x, y)
    for axis in range(first, len(dims)):
        # Pruning a normalised channel changes the mean and variance of the others: allowed (it is
        # how ConvNeXt/ViT channels are pruned) but flagged, so nobody expects exact equivalence.
        ctx.normalised(x, axis)
    for param, role in ((node.inputs[1], Role.NORM_SCALE), (_input(node, 2), Role.SHIFT)):
        if param is not None:
            _broadcast_into(ctx, [param], x, role)
    for stat in node.outputs[1:]:  # Mean, InvStdDev: normalised axes have size 1
        if stat is not None:
            _broadcast_into(ctx, [stat], x, None)


def _group_norm(ctx: ChannelContext, node: ir.Node) -> None:
    x, scale, bias, y = node.inputs[0], node.inputs[1], node.inputs[2], node.outputs[0]
    channels = ctx.shape(x)[1]
    groups = _attr_int(node, "num_groups", 1)
    _identity(ctx, x, y, axes=(0, 1))
    if channels is None:
        return
    per_group = channels // groups
    # A unit is a whole normalisation group, so the statistics of the kept groups never change.
    ctx.link(x, 1, x, 1, np.arange(channels), _block_leaders(channels, per_group, per_group))
    for param, role in ((scale, Role.NORM_SCALE), (bias, Role.SHIFT)):
        if ctx.shape(param)[0] == channels:  # opset 21: per channel
            ctx.link(param, 0, x, 1)
        else:  # opset 18: per group
            ctx.link(param, 0, x, 1, np.arange(groups), np.arange(groups) * per_group)
        ctx.role(param, 0, role)


def _softmax_like(ctx: ChannelContext, node: ir.Node) -> None:
    x, y = node.inputs[0], node.outputs[0]
    rank = len(ctx.shape(x))
    axis = _norm_axis(_attr_int(node, "axis", -1), rank)
    _identity(ctx, x, y, axes=[a for a in range(rank) if a != axis])


def _lrn(ctx: ChannelContext, node: ir.Node) -> None:
    x, y = node.inputs[0], node.outputs[0]
    rank = len(ctx.shape(x))
    _identity(ctx, x, y, axes=[a for a in range(rank) if a != 1])  # normalises across channels


# ----------------------------------------------------------------------------------------------
# pooling and reductions


def _pool(ctx: ChannelContext, node: ir.Node) -> None:
    x, y = node.inputs[0], node.outputs[0]
    _identity(ctx, x, y, axes=(0, 1))
    if len(node.outputs) > 1 and node.outputs[1] is not None:
        indices = node.outputs[1]
        if indices.uses() or indices.is_graph_output():
            ctx.freeze(x, 1)  # flat indices encode the channel count; pruning would shift them
        _identity(ctx, x, indices, axes=(0, 1))


def _reduce(ctx: ChannelContext, node: ir.Node) -> None:
    x, y = node.inputs[0], node.outputs[0]
    rank = len(ctx.shape(x))
    axes = _axes_from(node, ctx, 1)
    if axes is None and _input(node, 1) is not None:
        return  # axes computed at run time
    if axes is None or len(axes) == 0:
        if _attr_int(node, "noop_with_empty_axes", 0):
            _identity(ctx, x, y)
            return
        axes = list(range(rank))
    _link_unreduced(ctx, node, {_norm_axis(a, rank) for a in axes})
    _accept_all(ctx, node.inputs[1:])


def _arg_reduce(ctx: ChannelContext, node: ir.Node) -> None:
    rank = len(ctx.shape(node.inputs[0]))
    _link_unreduced(ctx, node, {_norm_axis(_attr_int(node, "axis", 0), rank)})


def _link_unreduced(ctx: ChannelContext, node: ir.Node, reduced: set[int]) -> None:
    """Axes kept by a reduction map to the output; reduced ones freeze (kept as size 1 with keepdims)."""
    x, y = node.inputs[0], node.outputs[0]
    keepdims = _attr_int(node, "keepdims", 1)
    out_axis = 0
    for axis in range(len(ctx.shape(x))):
        if axis in reduced:
            if keepdims:
                ctx.accept(y, out_axis)
                out_axis += 1
            continue
        ctx.link(x, axis, y, out_axis)
        out_axis += 1


# ----------------------------------------------------------------------------------------------
# data movement


def _concat(ctx: ChannelContext, node: ir.Node) -> None:
    y = node.outputs[0]
    rank = len(ctx.shape(y))
    axis = _norm_axis(_attr_int(node, "axis", 0), rank)
    offset = 0
    for x in _inputs(node):
        size = ctx.shape(x)[axis]
        _identity(ctx, x, y, axes=[a for a in range(rank) if a != axis])
        if size is None or ctx.shape(y)[axis] is None:
            # a symbolic concat axis (in an input, or in the output where a later input's is): offsets from
            # here on are unknown, leave them frozen
            return
        ctx.link(x, axis, y, axis, np.arange(size), offset + np.arange(size))
        offset += size


def _split(ctx: ChannelContext, node: ir.Node) -> None:
    x = node.inputs[0]
    rank = len(ctx.shape(x))
    axis = _norm_axis(_attr_int(node, "axis", 0), rank)
    offset = 0
    for y in node.outputs:
        size = ctx.shape(y)[axis]
        _identity(ctx, x, y, axes=[a for a in range(rank) if a != axis])
        if size is None or ctx.shape(x)[axis] is None:
            return
        ctx.link(x, axis, y, axis, offset + np.arange(size), np.arange(size))
        offset += size
    ctx.accept(x, axis)  # elements beyond the last output (none in a valid model)
    _accept_all(ctx, node.inputs[1:])


def _rewrite_split(ctx: RewriteContext, node: ir.Node) -> None:
    axis_attr = _attr_int(node, "axis", 0)
    rank = len(node.inputs[0].shape)
    axis = _norm_axis(axis_attr, rank)
    kept = [ctx.kept(y, axis) for y in node.outputs]
    if all(k is None for k in kept):
        return
    sizes = [len(k) if k is not None else y.shape[axis] for k, y in zip(kept, node.outputs)]
    node.attributes.pop("num_outputs", None)  # explicit sizes replace an even split
    if len(node.inputs) < 2:
        node.resize_inputs(2)
    ctx.replace_input(node, 1, np.asarray(sizes, dtype=np.int64))


def _slice_bounds(ctx: ChannelContext | RewriteContext, node: ir.Node, dims: Dims):
    """Per sliced axis, (start, step) normalised as ONNX does; None when bounds are not constant."""
    starts, ends = ctx.const(node.inputs[1]), ctx.const(node.inputs[2])
    axes_in, steps_in = _input(node, 3), _input(node, 4)
    axes = ctx.const(axes_in) if axes_in is not None else np.arange(len(starts) if starts is not None else 0)
    steps = ctx.const(steps_in) if steps_in is not None else None
    if starts is None or ends is None or axes is None or (steps_in is not None and steps is None):
        return None
    steps = np.ones(len(starts), dtype=np.int64) if steps is None else steps
    bounds = {}
    for position, (axis, start, step) in enumerate(zip(axes, starts, steps)):
        axis = _norm_axis(int(axis), len(dims))
        dim = dims[axis]
        start = int(start)
        if dim is not None:
            start = start + dim if start < 0 else start
            start = min(max(start, 0), dim)
        bounds[axis] = (start, int(step), position)
    return bounds


def _slice(ctx: ChannelContext, node: ir.Node) -> None:
    x, y = node.inputs[0], node.outputs[0]
    dims, out_dims = ctx.shape(x), ctx.shape(y)
    bounds = _slice_bounds(ctx, node, dims)
    if bounds is None:
        return
    for axis in range(len(dims)):
        if axis not in bounds:
            ctx.link(x, axis, y, axis)
            continue
        start, step, _ = bounds[axis]
        if step != 1 or out_dims[axis] is None or dims[axis] is None:
            continue  # strided slices, and slices of a symbolic (sequence) axis, stay frozen
        size = out_dims[axis]
        ctx.link(x, axis, y, axis, start + np.arange(size), np.arange(size))
        ctx.accept(x, axis)  # elements sliced away carry no constraint
    _accept_all(ctx, node.inputs[1:])


def _rewrite_slice(ctx: RewriteContext, node: ir.Node) -> None:
    x, y = node.inputs[0], node.outputs[0]
    dims = tuple(d if isinstance(d, int) else None for d in x.shape)
    bounds = _slice_bounds(ctx, node, dims)
    if bounds is None:
        return  # run-time bounds: the analysis froze every axis through this slice
    starts, ends = ctx.const(node.inputs[1]).copy(), ctx.const(node.inputs[2]).copy()
    changed = False
    for axis, (start, _, position) in bounds.items():
        kept_in = ctx.kept(x, axis)
        if kept_in is None:
            continue
        kept_out = ctx.kept(y, axis)
        size = len(kept_out) if kept_out is not None else y.shape[axis]
        new_start = int(np.searchsorted(kept_in, start))
        starts[position], ends[position] = new_start, new_start + size
        changed = True
    if changed:
        ctx.replace_input(node, 1, starts)
        ctx.replace_input(node, 2, ends)


def _gather(ctx: ChannelContext, node: ir.Node) -> None:
    data, indices, y = node.inputs[0], node.inputs[1], node.outputs[0]
    rank = len(ctx.shape(data))
    axis = _norm_axis(_attr_int(node, "axis", 0), rank)
    index_rank = len(ctx.shape(indices))
    for a in range(rank):
        if a != axis:
            out_axis = a if a < axis else a + index_rank - 1
            ctx.link(data, a, y, out_axis)
            ctx.role(data, a, Role.OUT)  # an embedding table produces its feature axis
    idx = ctx.const(indices)
    size = ctx.shape(data)[axis]
    if idx is None:
        _identity_into(ctx, indices, y, offset=axis)
        return
    if size is None:
        return
    idx = np.where(idx < 0, idx + size, idx).astype(np.int64)
    ctx.accept(indices)
    if index_rank == 0:
        ctx.freeze(data, axis, np.atleast_1d(idx))  # the one gathered channel must stay
        ctx.accept(data, axis)
    elif index_rank == 1:
        ctx.link(data, axis, y, axis, idx, np.arange(len(idx)))
        ctx.accept(data, axis)


def _identity_into(ctx: ChannelContext, src: ir.Value, dst: ir.Value, offset: int) -> None:
    for a in range(len(ctx.shape(src))):
        ctx.link(src, a, dst, a + offset)


def _rewrite_gather(ctx: RewriteContext, node: ir.Node) -> None:
    data, indices, y = node.inputs[0], node.inputs[1], node.outputs[0]
    idx = ctx.const(indices)
    axis = _norm_axis(_attr_int(node, "axis", 0), len(data.shape))
    kept_data = ctx.kept(data, axis)
    if idx is None or kept_data is None:
        return
    size = data.shape[axis]
    idx = np.where(idx < 0, idx + size, idx).astype(np.int64)
    if idx.ndim == 1:
        kept_out = ctx.kept(y, axis)
        if kept_out is not None:
            idx = idx[kept_out]
    ctx.replace_input(node, 1, np.searchsorted(kept_data, idx).astype(np.int64))


def _transpose(ctx: ChannelContext, node: ir.Node) -> None:
    x, y = node.inputs[0], node.outputs[0]
    rank = len(ctx.shape(x))
    perm = _attr_ints(node, "perm") or list(reversed(range(rank)))
    for out_axis, in_axis in enumerate(perm):
        ctx.link(x, in_axis, y, out_axis)


def _squeeze(ctx: ChannelContext, node: ir.Node) -> None:
    x, y = node.inputs[0], node.outputs[0]
    dims = ctx.shape(x)
    axes = _axes_from(node, ctx, 1)
    if axes is None and _input(node, 1) is not None:
        return
    removed = {a for a, d in enumerate(dims) if d == 1} if axes is None else {_norm_axis(a, len(dims)) for a in axes}
    kept_axes = [a for a in range(len(dims)) if a not in removed]
    for out_axis, in_axis in enumerate(kept_axes):
        ctx.link(x, in_axis, y, out_axis)
    for a in removed:
        ctx.accept(x, a)
    _accept_all(ctx, node.inputs[1:])


def _unsqueeze(ctx: ChannelContext, node: ir.Node) -> None:
    x, y = node.inputs[0], node.outputs[0]
    out_rank = len(ctx.shape(y))
    axes = _axes_from(node, ctx, 1)
    if axes is None:
        return
    inserted = {_norm_axis(a, out_rank) for a in axes}
    kept_axes = [a for a in range(out_rank) if a not in inserted]
    for in_axis, out_axis in enumerate(kept_axes):
        ctx.link(x, in_axis, y, out_axis)
    for a in inserted:
        ctx.accept(y, a)
    _accept_all(ctx, node.inputs[1:])


def reshape_factors(in_dims: Dims, out_dims: Dims) -> list[tuple[list[int], list[int]]] | None:
    """Pair up runs of input and output axes whose sizes multiply to the same number.

    ``[N, C, H, W] -> [N, C*H*W]`` gives ``[([0], [0]), ([1, 2, 3], [1])]``. Size-1 axes form runs of
    their own. Symbolic dims pair up only with symbolic dims. Returns None if the shapes do not factor.
    """
    runs: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(in_dims) or j < len(out_dims):
        a = in_dims[i] if i < len(in_dims) else -1
        b = out_dims[j] if j < len(out_dims) else -1
        if a == 1 and b == 1:
            runs.append(([i], [j]))
            i, j = i + 1, j + 1
        elif a == 1:
            runs.append(([i], []))
            i += 1
        elif b == 1:
            runs.append(([], [j]))
            j += 1
        elif a is None or b is None:
            # Symbolic dims (batch, tokens) are never channels. A run of them on each side pairs up as one
            # unlinked run, e.g. [L, N, H, d] -> [L*N, E]: the static runs after it must still factor, and
            # since the totals agree, the symbolic products then agree too.
            ins, outs = [], []
            while i < len(in_dims) and in_dims[i] is None:
                ins.append(i)
                i += 1
            while j < len(out_dims) and out_dims[j] is None:
                outs.append(j)
                j += 1
            if not ins or not outs:
                return None
            runs.append((ins, outs))
        elif a == -1 or b == -1:
            return None
        else:
            ins, outs, prod_in, prod_out = [i], [j], a, b
            i, j = i + 1, j + 1
            while prod_in != prod_out:
                if prod_in < prod_out:
                    if i >= len(in_dims) or in_dims[i] is None:
                        return None
                    prod_in *= in_dims[i]
                    ins.append(i)
                    i += 1
                else:
                    if j >= len(out_dims) or out_dims[j] is None:
                        return None
                    prod_out *= out_dims[j]
                    outs.append(j)
                    j += 1
            runs.append((ins, outs))
    return runs


def _reshape_like(ctx: ChannelContext, x: ir.Value, y: ir.Value) -> None:
    """Reshape and Flatten: the outermost axis of each run carries channel blocks; inner axes freeze."""
    in_dims, out_dims = ctx.shape(x), ctx.shape(y)
    runs = reshape_factors(in_dims, out_dims)
    if runs is None:
        return
    for ins, outs in runs:
        if not ins or not outs:
            for a in ins:
                ctx.accept(x, a)
            for b in outs:
                ctx.accept(y, b)
            continue
        if len(ins) == 1 and len(outs) == 1:
            ctx.link(x, ins[0], y, outs[0])
            continue
        if in_dims[ins[0]] is None:  # a run of symbolic dims: nothing to link
            for a in ins:
                ctx.accept(x, a)
            for b in outs:
                ctx.accept(y, b)
            continue
        # Flat position f inside the run belongs to block f // (run size / outer size) of each side's
        # outermost axis; linking those blocks makes a channel's whole block go with it.
        total = int(np.prod([in_dims[a] for a in ins]))
        flat = np.arange(total)
        ctx.link(x, ins[0], y, outs[0], flat // (total // in_dims[ins[0]]), flat // (total // out_dims[outs[0]]))
        for a in ins[1:]:
            if in_dims[a] == 1:
                ctx.accept(x, a)
        for b in outs[1:]:
            if out_dims[b] == 1:
                ctx.accept(y, b)


def _reshape(ctx: ChannelContext, node: ir.Node) -> None:
    if ctx.const(node.inputs[1]) is None:
        return  # a target computed at run time cannot be rewritten: freeze
    _reshape_like(ctx, node.inputs[0], node.outputs[0])
    ctx.accept(node.inputs[1])


def _rewrite_reshape(ctx: RewriteContext, node: ir.Node) -> None:
    target = ctx.const(node.inputs[1])
    if target is None:
        return  # computed at run time: the analysis froze every axis through it
    y = node.outputs[0]
    new_target = target.copy()
    changed = False
    for axis, entry in enumerate(target):
        kept = ctx.kept(y, axis)
        if kept is not None and entry not in (0, -1):
            new_target[axis] = len(kept)
            changed = True
    if changed:
        ctx.replace_input(node, 1, new_target)


def _flatten(ctx: ChannelContext, node: ir.Node) -> None:
    _reshape_like(ctx, node.inputs[0], node.outputs[0])


def _expand(ctx: ChannelContext, node: ir.Node) -> None:
    if ctx.const(node.inputs[1]) is None:
        return
    _broadcast_into(ctx, [node.inputs[0]], node.outputs[0], None)
    ctx.accept(node.inputs[1])


def _rewrite_expand(ctx: RewriteContext, node: ir.Node) -> None:
    target = ctx.const(node.inputs[1])
    if target is None:
        return  # computed at run time: the analysis froze every axis through it
    y = node.outputs[0]
    offset = len(y.shape) - len(target)
    new_target = target.copy()
    for position, entry in enumerate(target):
        kept = ctx.kept(y, position + offset)
        if kept is not None and entry != 1:
            new_target[position] = len(kept)
    if not np.array_equal(new_target, target):
        ctx.replace_input(node, 1, new_target)


def _tile(ctx: ChannelContext, node: ir.Node) -> None:
    repeats = ctx.const(node.inputs[1])
    if repeats is None:
        return
    x, y = node.inputs[0], node.outputs[0]
    _identity(ctx, x, y, axes=[a for a, r in enumerate(repeats) if r == 1])
    ctx.accept(node.inputs[1])


def _pad(ctx: ChannelContext, node: ir.Node) -> None:
    x, y = node.inputs[0], node.outputs[0]
    rank = len(ctx.shape(x))
    pads = ctx.const(_input(node, 1))
    if pads is None:
        return
    axes_value = _input(node, 3)
    axes = list(range(rank)) if axes_value is None else [_norm_axis(int(a), rank) for a in ctx.const(axes_value)]
    padded = {axis for k, axis in enumerate(axes) if pads[k] != 0 or pads[k + len(axes)] != 0}
    _identity(ctx, x, y, axes=[a for a in range(rank) if a not in padded])
    _accept_all(ctx, node.inputs[1:])


def _resize(ctx: ChannelContext, node: ir.Node) -> None:
    x, y = node.inputs[0], node.outputs[0]
    in_dims, out_dims = ctx.shape(x), ctx.shape(y)
    _identity(ctx, x, y, axes=[a for a in range(len(in_dims)) if in_dims[a] == out_dims[a]])
    _accept_all(ctx, node.inputs[1:])


def _rewrite_resize(ctx: RewriteContext, node: ir.Node) -> None:
    sizes_value = _input(node, 3)
    sizes = ctx.const(sizes_value)
    if sizes is None:
        return
    y = node.outputs[0]
    new_sizes = sizes.copy()
    for axis in range(len(sizes)):
        kept = ctx.kept(y, axis)
        if kept is not None:
            new_sizes[axis] = len(kept)
    if not np.array_equal(new_sizes, sizes):
        ctx.replace_input(node, 3, new_sizes)


def _link_channel_blocks(ctx: ChannelContext, coarse: ir.Value, fine: ir.Value, block: int, crd: bool) -> None:
    """Each of `coarse`'s C channels is `block` channels of `fine`: at k*C + c (DCR) or c*block + k (CRD)."""
    channels = ctx.shape(coarse)[1]
    ctx.link(coarse, 0, fine, 0)
    if channels is None:
        return
    c = np.arange(channels)
    for k in range(block):
        ctx.link(fine, 1, coarse, 1, c * block + k if crd else k * channels + c, c)


def _depth_to_space(ctx: ChannelContext, node: ir.Node) -> None:
    mode = node.attributes.get("mode")
    crd = mode is not None and mode.value == "CRD"
    _link_channel_blocks(ctx, node.outputs[0], node.inputs[0], _attr_int(node, "blocksize", 1) ** 2, crd)


def _space_to_depth(ctx: ChannelContext, node: ir.Node) -> None:
    _link_channel_blocks(ctx, node.inputs[0], node.outputs[0], _attr_int(node, "blocksize", 1) ** 2, crd=False)


def _shape_reader(ctx: ChannelContext, node: ir.Node) -> None:
    """Shape/Size read dims but do not constrain channels; later shape arithmetic is frozen elsewhere."""
    _accept_all(ctx, list(node.inputs) + list(node.outputs))


# ----------------------------------------------------------------------------------------------
# the table

_UNARY_OPS = (
    "Abs Acos Acosh Asin Asinh Atan Atanh BitwiseNot Cast CastLike Ceil Celu Clip Cos Cosh Dropout Elu "
    "Erf Exp Floor Gelu HardSigmoid HardSwish Identity IsInf IsNaN LeakyRelu Log Mish Neg Not Reciprocal "
    "Relu Round Selu Shrink Sigmoid Sign Sin Sinh Softplus Softsign Sqrt Tan Tanh ThresholdedRelu"
).split()
# ops whose first output always has their first input's shape
SHAPE_PRESERVING_OPS = frozenset(
    [o for o in _UNARY_OPS if o not in ("Cast", "CastLike")]
    + "BatchNormalization GroupNormalization Hardmax InstanceNormalization LayerNormalization LogSoftmax LRN Softmax".split()
)
_SCALING_OPS = ("Mul", "Div", "PRelu")
_SHIFTING_OPS = ("Add", "Sub")
_OTHER_BROADCAST_OPS = (
    "And BitShift BitwiseAnd BitwiseOr BitwiseXor Equal Greater GreaterOrEqual Less LessOrEqual Max Mean "
    "Min Mod Or Pow Sum Where Xor"
).split()
_REDUCE_OPS = (
    "ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum "
    "ReduceSumSquare"
).split()
_POOL_OPS = "AveragePool GlobalAveragePool GlobalLpPool GlobalMaxPool LpPool MaxPool".split()

CHANNEL_RULES: dict[str, OpRule] = {
    **{op: OpRule(_unary) for op in _UNARY_OPS},
    **{op: OpRule(_broadcasting(Role.SCALE)) for op in _SCALING_OPS},
    **{op: OpRule(_broadcasting(Role.SHIFT)) for op in _SHIFTING_OPS},
    **{op: OpRule(_broadcasting(None)) for op in _OTHER_BROADCAST_OPS},
    **{op: OpRule(_reduce) for op in _REDUCE_OPS},
    **{op: OpRule(_pool) for op in _POOL_OPS},
    "ArgMax": OpRule(_arg_reduce),
    "ArgMin": OpRule(_arg_reduce),
    "Conv": OpRule(_conv, _rewrite_group(0, "group")),
    "ConvTranspose": OpRule(_conv_transpose, _rewrite_group(0, "group")),
    "Gemm": OpRule(_gemm),
    "MatMul": OpRule(_matmul),
    "BatchNormalization": OpRule(_batch_norm),
    "InstanceNormalization": OpRule(_instance_norm),
    "LayerNormalization": OpRule(_layer_norm),
    "GroupNormalization": OpRule(_group_norm, _rewrite_group(0, "num_groups")),
    "Softmax": OpRule(_softmax_like),
    "LogSoftmax": OpRule(_softmax_like),
    "Hardmax": OpRule(_softmax_like),
    "LRN": OpRule(_lrn),
    "Concat": OpRule(_concat),
    "Split": OpRule(_split, _rewrite_split),
    "Slice": OpRule(_slice, _rewrite_slice),
    "Gather": OpRule(_gather, _rewrite_gather),
    "Transpose": OpRule(_transpose),
    "Squeeze": OpRule(_squeeze),
    "Unsqueeze": OpRule(_unsqueeze),
    "Reshape": OpRule(_reshape, _rewrite_reshape),
    "Flatten": OpRule(_flatten),
    "Expand": OpRule(_expand, _rewrite_expand),
    "Tile": OpRule(_tile),
    "Pad": OpRule(_pad),
    "Resize": OpRule(_resize, _rewrite_resize),
    "DepthToSpace": OpRule(_depth_to_space),
    "SpaceToDepth": OpRule(_space_to_depth),
    "Shape": OpRule(_shape_reader),
    "Size": OpRule(_shape_reader),
}


def rule_for(node: ir.Node) -> OpRule | None:
    """The channel rule of a node, or None: the node is a barrier.

    A node reading or writing a tensor whose rank nothing could infer (the output of an If whose branches
    disagree, of a custom op, of shape arithmetic onnx gives up on) is a barrier too: its channels cannot
    be mapped, so they are frozen and `pcc inspect` lists the node, instead of the whole model being
    refused (silero's decoder after its LSTM-in-an-If is such a chain).
    """
    if _has_unknown_rank(node):
        return None
    from pcc.passes.analysis.fused_attention import FUSED_ATTENTION_RULES  # fused attention ops; it imports this module

    fused = FUSED_ATTENTION_RULES.get(("" if node.domain == "ai.onnx" else node.domain, node.op_type))
    if fused is not None:
        return fused
    if node.domain not in ("", "ai.onnx"):
        return None
    return CHANNEL_RULES.get(node.op_type)


def _has_unknown_rank(node: ir.Node) -> bool:
    # outputs nothing reads (BatchNormalization's training statistics, an LSTM's unused states) do not count
    outputs = [v for v in node.outputs if v is not None and (v.uses() or v.is_graph_output())]
    return any(v.shape is None and v.const_value is None for v in [*_inputs(node), *outputs])
