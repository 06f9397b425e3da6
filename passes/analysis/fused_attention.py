"""Channel rules of fused attention ops, so that their heads are dependency groups like an unfused block's.

onnxruntime's transformer optimizer turns a BERT layer's Q/K/V projections and attention core into one
`com.microsoft` `Attention` node with a packed [E, 3·E] weight; `com.microsoft` `MultiHeadAttention` and
opset-23 `Attention` take Q, K and V already projected. Without a rule these nodes are barriers and no
head could go. The rules below say which elements belong to one head: the head's slice of each packed
Q/K/V block (or of the Q, K and V inputs) and its slice of the output, tied together as one unit, so the
channel analysis removes the head's Q/K/V projection rows and output-projection inputs together. A
grouped-query unit is one key/value head with the query heads that read it, so the grouping survives.
The rewrites set the head-count attributes (`num_heads`, `q_num_heads`/`kv_num_heads`) to what is left.

Ops with caches (past/present inputs or outputs), unequal `qkv_hidden_sizes`, unknown shapes or an
unfamiliar layout get no links: their channels freeze, as for a barrier.

`InferContribShapes` completes the value shapes of graphs with `com.microsoft` ops, which onnx's shape
inference cannot see through (the channel analysis needs every shape it links).
"""

from __future__ import annotations

import contextlib
import tempfile
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from pcc.passes.analysis.channel_rules import ChannelContext, OpRule, RewriteContext, Role

__all__ = ["FUSED_ATTENTION_RULES", "InferContribShapes"]


def _known(value: ir.Value | None) -> bool:
    return value is not None and (value.shape is not None or value.const_value is not None)


def _accept_known(ctx: ChannelContext, values) -> None:
    """Masks and sequence lengths carry no channels; values of unknown shape are left alone."""
    for value in values:
        if _known(value):
            ctx.accept(value)


def _tie_heads(ctx: ChannelContext, value: ir.Value, axis: int, head_dim: int) -> None:
    """Every element of a head's slice of `axis` is one unit with the head's first element."""
    index = np.arange(ctx.shape(value)[axis])
    ctx.link(value, axis, value, axis, index, index - index % head_dim)


def _has_cache(node: ir.Node, first_cache_input: int) -> bool:
    return any(v is not None for v in node.outputs[1:]) or any(v is not None for v in node.inputs[first_cache_input:])


def _set_int(node: ir.Node, name: str, value: int) -> None:
    node.attributes[name] = ir.AttrInt64(name, value)


# -- com.microsoft Attention: input [B, S, E] x packed weight [E, Q+K+V] (+ bias) -> [B, S, V]


def _packed_width(ctx: ChannelContext | RewriteContext, node: ir.Node) -> int | None:
    """Q = K = V width of the packed weight, or None for layouts without a per-head link."""
    sizes = node.attributes.get_ints("qkv_hidden_sizes", None)
    weight = ctx.const(node.inputs[1])
    if weight is None or weight.ndim != 2 or weight.shape[1] % 3 or (sizes and len(set(sizes)) != 1):
        return None
    return weight.shape[1] // 3


def _ms_attention(ctx: ChannelContext, node: ir.Node) -> None:
    x, weight, y = node.inputs[0], node.inputs[1], node.outputs[0]
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    heads = node.attributes.get_int("num_heads", 0)
    width = _packed_width(ctx, node)
    if not (_known(x) and _known(y)) or width is None or not heads or width % heads or _has_cache(node, 4):
        return
    if ctx.shape(y)[-1] != width:
        return
    ctx.link(x, -1, weight, 0)
    ctx.role(weight, 0, Role.IN)
    features = np.arange(width)
    for part in range(3):  # the head's Q, K and V columns of the packed weight, and its output features
        ctx.link(y, -1, weight, 1, features, part * width + features)
        if bias is not None:
            ctx.link(y, -1, bias, 0, features, part * width + features)
    ctx.role(weight, 1, Role.OUT)
    if bias is not None:
        ctx.role(bias, 0, Role.SHIFT)
    _tie_heads(ctx, y, -1, width // heads)
    _accept_known(ctx, [x, y, *node.inputs[3:4]])


def _rewrite_ms_attention(ctx: RewriteContext, node: ir.Node) -> None:
    kept = ctx.kept(node.outputs[0], len(node.outputs[0].shape) - 1)
    width = _packed_width(ctx, node)
    if kept is None or width is None:
        return
    head_dim = width // node.attributes.get_int("num_heads")
    _set_int(node, "num_heads", len(kept) // head_dim)
    if node.attributes.get_ints("qkv_hidden_sizes", None):
        node.attributes["qkv_hidden_sizes"] = ir.AttrInt64s("qkv_hidden_sizes", [len(kept)] * 3)


# -- com.microsoft MultiHeadAttention: projected Q [B, S, E], K, V [B, L, E] (+ packed bias) -> [B, S, E]


def _ms_multi_head(ctx: ChannelContext, node: ir.Node) -> None:
    query, key, value = (node.inputs[i] if len(node.inputs) > i else None for i in range(3))
    bias = node.inputs[3] if len(node.inputs) > 3 else None
    y, heads = node.outputs[0], node.attributes.get_int("num_heads", 0)
    if not all(_known(v) for v in (query, key, value, y)) or not heads or _has_cache(node, 6):
        return
    width = ctx.shape(y)[-1]
    if any(len(ctx.shape(v)) != 3 or ctx.shape(v)[-1] != width for v in (query, key, value)) or width % heads:
        return  # packed QKV/KV layouts and unequal widths: frozen
    for operand in (query, key, value):
        ctx.link(y, -1, operand, -1)
    if bias is not None:
        features = np.arange(width)
        for part in range(3):
            ctx.link(y, -1, bias, 0, features, part * width + features)
        ctx.role(bias, 0, Role.SHIFT)
    _tie_heads(ctx, y, -1, width // heads)
    _accept_known(ctx, [query, key, value, y, *node.inputs[4:6]])


def _rewrite_ms_multi_head(ctx: RewriteContext, node: ir.Node) -> None:
    y = node.outputs[0]
    kept = ctx.kept(y, len(y.shape) - 1)
    if kept is not None:
        head_dim = y.shape[-1] // node.attributes.get_int("num_heads")
        _set_int(node, "num_heads", len(kept) // head_dim)


# -- opset-23 Attention: Q [B, Hq, S, d], K/V [B, Hkv, L, d], or 3-D [B, S, H·d] with head-count attributes


def _onnx_attention(ctx: ChannelContext, node: ir.Node) -> None:
    query, key, value = node.inputs[:3]
    y = node.outputs[0]
    if not all(_known(v) for v in (query, key, value, y)) or _has_cache(node, 4):
        return
    rank = len(ctx.shape(query))
    if rank == 4:
        q_heads, kv_heads = ctx.shape(query)[1], ctx.shape(key)[1]
        if q_heads is None or kv_heads is None or q_heads % kv_heads:
            return
        heads = np.arange(q_heads)
        ctx.link(y, 1, query, 1)
        for operand in (key, value):  # a query head reads key/value head h // group
            ctx.link(y, 1, operand, 1, heads, heads // (q_heads // kv_heads))
        for operand in (query, key, value, y):
            ctx.accept(operand, 0)
            ctx.accept(operand, 2)
    elif rank == 3:
        q_heads = node.attributes.get_int("q_num_heads", 0)
        kv_heads = node.attributes.get_int("kv_num_heads", 0)
        width, kv_width, v_width = ctx.shape(query)[2], ctx.shape(key)[2], ctx.shape(value)[2]
        if not q_heads or not kv_heads or q_heads % kv_heads or None in (width, kv_width) or width % q_heads:
            return
        head_dim = width // q_heads
        if kv_width != kv_heads * head_dim or v_width != kv_width or ctx.shape(y)[2] != width:
            return
        features = np.arange(width)
        kv_features = (features // head_dim) // (q_heads // kv_heads) * head_dim + features % head_dim
        ctx.link(y, 2, query, 2)
        for operand in (key, value):
            ctx.link(y, 2, operand, 2, features, kv_features)
        _tie_heads(ctx, y, 2, head_dim)
        for operand in (query, key, value, y):
            ctx.accept(operand, 0)
            ctx.accept(operand, 1)
    _accept_known(ctx, node.inputs[3:4])


def _rewrite_onnx_attention(ctx: RewriteContext, node: ir.Node) -> None:
    y = node.outputs[0]
    q_heads = node.attributes.get_int("q_num_heads", 0)
    kept = ctx.kept(y, 2)
    if len(y.shape) != 3 or kept is None or not q_heads:
        return  # 4-D: the head count is the inputs' axis 1, rewritten with the projections' Reshapes
    head_dim = y.shape[2] // q_heads
    group = q_heads // node.attributes.get_int("kv_num_heads", q_heads)
    _set_int(node, "q_num_heads", len(kept) // head_dim)
    _set_int(node, "kv_num_heads", len(kept) // head_dim // group)


FUSED_ATTENTION_RULES: dict[tuple[str, str], OpRule] = {
    ("com.microsoft", "Attention"): OpRule(_ms_attention, _rewrite_ms_attention),
    ("com.microsoft", "MultiHeadAttention"): OpRule(_ms_multi_head, _rewrite_ms_multi_head),
    ("", "Attention"): OpRule(_onnx_attention, _rewrite_onnx_attention),
}


@dataclass
class InferContribShapes(ir.passes.InPlacePass):
    """Complete missing value shapes with onnxruntime's symbolic shape inference, which knows the
    `com.microsoft` ops (onnx's own inference stops at them). Runs only on graphs that have such ops.

    `refine`: also replace a shape that has symbolic dims by a fully static inferred one (on a copy
    specialised to fixed sizes, where values after a fused op keep the original's symbolic annotation)."""

    refine: bool = False

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if not any(node.domain == "com.microsoft" for node in model.graph):
            return ir.passes.PassResult(model, False)
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        proto = ir.serde.serialize_model(model)
        if self.refine:  # the inference keeps a shape it is given: give it only the static ones
            static = [info for info in proto.graph.value_info
                      if all(d.HasField("dim_value") for d in info.type.tensor_type.shape.dim)]
            del proto.graph.value_info[:]
            proto.graph.value_info.extend(static)
        try:
            # where it gives up, it saves its partial model to the working directory: keep that out of the user's
            with tempfile.TemporaryDirectory() as scratch, contextlib.chdir(scratch):
                inferred = SymbolicShapeInference.infer_shapes(proto, auto_merge=True)
        except Exception:  # an op it has no handler for: keep the shapes we have
            return ir.passes.PassResult(model, False)
        infos = {info.name: info for info in inferred.graph.value_info}
        modified = False
        for node in model.graph:
            for value in node.outputs:
                info = infos.get(value.name)
                if info is None or not info.type.tensor_type.HasField("shape"):
                    continue
                dims = [d.dim_value if d.HasField("dim_value") else ir.SymbolicDim(d.dim_param or None)
                        for d in info.type.tensor_type.shape.dim]
                static = all(isinstance(d, int) for d in dims)
                if value.shape is not None and not (self.refine and static and not value.shape.is_static()):
                    continue
                value.shape = ir.Shape(dims)
                if value.dtype is None:
                    value.dtype = ir.DataType(info.type.tensor_type.elem_type)
                modified = True
        return ir.passes.PassResult(model, modified)
