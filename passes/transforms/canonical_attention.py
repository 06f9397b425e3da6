"""CanonicalAttentionLayout: rewrite how Q, K, V and the context are split into and merged from heads.

`torch.nn.MultiheadAttention` exports its head split as Reshape → Unsqueeze → Transpose → Squeeze →
Gather → Reshape([L, N*H, d]) → Transpose → Reshape([N, H, L, d]), with the head count merged into the
batch axis and the targets computed at run time. The channel analysis cannot follow a head through an
axis it shares with the batch, so such attention would never lose a head. Every such chain only moves
elements, so it equals a canonical one: [Slice of the fused projection] → Reshape([0, .., 0, H, d]) →
Transpose (and Transpose → Reshape([.., E]) on the way out), which the channel rules do follow.

Which canonical chain a given export equals is read off, not guessed: the model is run once in
onnxruntime with each chain's input replaced by its own element indices, and the chain's output says
where every element went. A chain whose elements do not move as heads (a layout pcc does not know) is
left alone, and its heads stay unprunable.

Two layouts are rewritten from their shapes before any probing. Grouped-query attention repeats each
key/value head for its query heads with Unsqueeze → Expand → Reshape whose targets torch's exporter
computes at run time; the shapes inferred for them give equivalent constant targets ([1, .., g, ..] and
[0, H, -1, d]), which the channel rules follow (a key/value head and its query heads become one unit).
torch's SDPA decomposition transposes K as Reshape([B·H, S, d]) → Transpose → Reshape([B, H, d, S]),
which equals one Transpose of the last two axes, as it becomes. And a head-merging Reshape whose output
shape onnx's inference left open (legacy exports: [0, 0, -1] from a symbolic-length input) gets it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from pcc.passes.analysis.attention import find_attention_cores, movement_source, output_chain

__all__ = ["CanonicalAttentionLayout"]

_PROBE_SIZES = (5, 7, 11, 13, 17, 19)  # concrete sizes for symbolic dims: distinct, and unlike head counts


@dataclass(frozen=True)
class _Chain:
    """Data movement from `start` (a projection output, or the core's context) to `end`."""

    start: ir.Value
    end: ir.Value
    into_heads: bool  # projection → core operand; False: context → output projection


def _is_canonical(chain: list[ir.Node]) -> bool:
    """At most a Slice/Split, one head-splitting Reshape with a constant target, Transposes, and the
    Unsqueeze → Expand → Reshape of a grouped-query repeat (constant targets)."""
    kinds = [node.op_type for node in chain]
    shaping = [node for node in chain if node.op_type in ("Reshape", "Expand")]
    repeats = [node for node in chain if node.op_type == "Reshape" and node.inputs[0].producer() in chain
               and node.inputs[0].producer().op_type == "Expand"]
    return (
        sum(node.op_type == "Reshape" for node in chain) - len(repeats) <= 1
        and all(node.inputs[1].const_value is not None for node in shaping)
        and set(kinds) <= {"Reshape", "Transpose", "Slice", "Split", "Unsqueeze", "Expand"}
        and kinds.count("Slice") + kinds.count("Split") <= 1
    )


def _same(a, b) -> bool:
    """Two dims known to be equal: the same number, or the same named symbolic size."""
    if isinstance(a, int) or isinstance(b, int):
        return a == b
    return a is not None and b is not None and a.value is not None and a.value == b.value


def _static_expand_target(node: ir.Node) -> np.ndarray | None:
    """Expand to an inferred shape as a constant target: 1 where the input already has the size."""
    x, y = node.inputs[0].shape, node.outputs[0].shape
    if x is None or y is None or len(x) != len(y):
        return None
    target = []
    for before, after in zip(x, y):
        if _same(before, after):
            target.append(1)
        elif before == 1 and isinstance(after, int):
            target.append(after)
        else:
            return None
    return np.asarray(target, dtype=np.int64)


def _static_reshape_target(x: ir.Shape | None, y: ir.Shape | None) -> np.ndarray | None:
    """Reshape to an inferred shape as a constant target: numbers, 0 where the input has the same size at
    that position, and -1 for at most one remaining (symbolic) size."""
    if x is None or y is None:
        return None
    target = []
    for position, after in enumerate(y):
        if isinstance(after, int):
            target.append(after)
        elif position < len(x) and _same(x[position], after):
            target.append(0)
        else:
            target.append(-1)
    return np.asarray(target, dtype=np.int64) if target.count(-1) <= 1 else None


def _constant_repeat_targets(graph: ir.Graph, operand: ir.Value) -> bool:
    """Give a grouped-query repeat (Expand, then the Reshape merging the repeats) constant targets."""
    modified = False
    for node in movement_source(operand)[1]:
        if node.op_type != "Expand" or node.inputs[1].const_value is not None:
            continue
        target = _static_expand_target(node)
        users = [use.node for use in node.outputs[0].uses()]
        merge = users[0] if len(users) == 1 and users[0].op_type == "Reshape" else None
        merge_target = _static_reshape_target(node.outputs[0].shape, merge.outputs[0].shape) if merge else None
        if target is None or merge_target is None:
            continue
        node.replace_input_with(1, _constant(graph, f"{node.name}_static_target", target))
        if merge.inputs[1].const_value is None:
            merge.replace_input_with(1, _constant(graph, f"{merge.name}_static_target", merge_target))
            merge.attributes.pop("allowzero", None)
        modified = True
    return modified


def _fold_key_transpose(graph: ir.Graph, key: ir.Value) -> bool:
    """Reshape([B·H, S, d]) → Transpose(0, 2, 1) → Reshape([B, H, d, S]) on [B, H, S, d] → one Transpose."""
    split = key.producer()
    transpose = split.inputs[0].producer() if split is not None and split.op_type == "Reshape" else None
    merge = transpose.inputs[0].producer() if transpose is not None and transpose.op_type == "Transpose" else None
    if merge is None or merge.op_type != "Reshape" or tuple(transpose.attributes.get_ints("perm", ())) != (0, 2, 1):
        return False
    x, merged, y = merge.inputs[0].shape, merge.outputs[0].shape, key.shape
    if x is None or merged is None or y is None or (len(x), len(merged), len(y)) != (4, 3, 4):
        return False
    if not (_same(merged[1], x[2]) and _same(merged[2], x[3]) and _same(y[0], x[0]) and _same(y[1], x[1])
            and _same(y[2], x[3]) and _same(y[3], x[2])):
        return False
    folded = _add(graph, split, "Transpose", [merge.inputs[0]], f"{split.name}_as_transpose", list(y), key.dtype,
                  perm=[0, 1, 3, 2])
    ir.convenience.replace_all_uses_with(key, folded)
    return True


def _complete_reshape_shapes(chain: list[ir.Node]) -> bool:
    """Output shapes of constant-target Reshapes that shape inference left open (onnx names such a dim
    `unk__N`): 0 entries copy the input's size, and -1 is a number when every other input size is."""
    modified = False
    for node in (n for n in chain if n.op_type == "Reshape"):
        y, x, target = node.outputs[0], node.inputs[0].shape, node.inputs[1].const_value
        if target is None or x is None or (y.shape is not None and all(isinstance(d, int) for d in y.shape)):
            continue
        entries = [int(e) for e in target.numpy()]
        dims = [x[i] if e == 0 else e for i, e in enumerate(entries)]
        copied = {i for i, e in enumerate(entries) if e == 0}
        rest = [d for i, d in enumerate(x) if i not in copied]
        if entries.count(-1) != 1 or not all(isinstance(d, int) for d in rest):
            continue
        dims[entries.index(-1)] = int(np.prod(rest)) // int(np.prod([e for e in entries if e > 0]))
        if y.shape is None or list(y.shape) != dims:
            y.shape = ir.Shape(dims)
            modified = True
    return modified


def _normalise_operands(model: ir.Model) -> bool:
    """The shape-based rewrites above, on every core's and fused op's operands and context."""
    graph, modified = model.graph, False
    operands, contexts = [], []
    for core in find_attention_cores(model):
        operands += [core.query, core.key, core.value]
        contexts.append(core.context.outputs[0])
    for node in graph:
        if node.op_type in ("Attention", "MultiHeadAttention") and node.domain in ("", "ai.onnx", "com.microsoft"):
            operands += [v for v in node.inputs[:3] if v is not None]
            contexts.append(node.outputs[0])
    for operand in operands:
        modified |= _constant_repeat_targets(graph, operand)
        modified |= _fold_key_transpose(graph, operand)
    for context in contexts:
        modified |= _complete_reshape_shapes(output_chain(context)[1])
    return modified


def _chains(model: ir.Model) -> list[_Chain]:
    chains = []
    for core in find_attention_cores(model):
        for operand in (core.query, core.key, core.value):
            source, chain = movement_source(operand)
            if chain and not _is_canonical(chain):
                chains.append(_Chain(source, operand, into_heads=True))
        output, chain = output_chain(core.context.outputs[0])
        if output is not None and chain and not _is_canonical(chain):
            chains.append(_Chain(core.context.outputs[0], output.inputs[0], into_heads=False))
    return chains


def _concrete_shape(value: ir.Value, sizes: dict[str, int]) -> tuple[int, ...] | None:
    if value.shape is None:
        return None
    dims = []
    for dim in value.shape:
        if isinstance(dim, int):
            dims.append(dim)
        elif dim.value is not None and dim.value in sizes:
            dims.append(sizes[dim.value])
        else:
            return None
    return tuple(dims)


def _run_shapes(proto: onnx.ModelProto, feeds: dict[str, np.ndarray], names: list[str]) -> dict[str, tuple[int, ...]]:
    """The shapes these values take on `feeds`, by running the model (legacy exports leave many unknown)."""
    from pcc.backends.onnx.runtime import session

    names = list(dict.fromkeys(names))
    if not names:
        return {}
    run = onnx.ModelProto()
    run.CopyFrom(proto)
    del run.graph.output[:]
    run.graph.output.extend(onnx.helper.make_empty_tensor_value_info(name) for name in names)
    return {name: array.shape for name, array in zip(names, session(run.SerializeToString()).run(names, feeds))}


def _probe(model: ir.Model, chains: list[_Chain]) -> dict[str, np.ndarray]:
    """Run the model with every chain start fed its own flat element indices; the chain ends, by name."""
    from pcc.backends.onnx.runtime import session

    names = {dim.value for v in model.graph.inputs if v.shape for dim in v.shape if isinstance(dim, ir.SymbolicDim)}
    sizes = dict(zip(sorted(n for n in names if n), _PROBE_SIZES))
    rng = np.random.default_rng(0)
    feeds = {}
    for value in model.graph.inputs:
        shape = _concrete_shape(value, sizes)
        if shape is None:
            return {}
        dtype = value.dtype.numpy()
        feeds[value.name] = (rng.standard_normal(shape) if dtype.kind == "f" else np.ones(shape)).astype(dtype)
    proto = ir.serde.serialize_model(model)
    producers = {output: node for node in proto.graph.node for output in node.output}
    shapes = _run_shapes(proto, feeds, [c.start.name for c in chains if _concrete_shape(c.start, sizes) is None])
    starts = {}
    for chain in chains:
        shape = _concrete_shape(chain.start, sizes) or shapes.get(chain.start.name)
        if shape is None or chain.start.dtype != ir.DataType.FLOAT or chain.start.name in starts:
            continue
        starts[chain.start.name] = np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape)
        node = producers[chain.start.name]
        node.output[list(node.output).index(chain.start.name)] = f"{chain.start.name}__pcc_probe_unused"
        proto.graph.input.append(onnx.helper.make_tensor_value_info(chain.start.name, onnx.TensorProto.FLOAT, shape))
    ends = [c.end.name for c in chains if c.start.name in starts]
    if not ends:
        return {}
    del proto.graph.output[:]
    proto.graph.output.extend(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in ends)
    results = session(proto.SerializeToString()).run(ends, {**feeds, **starts})
    return {**{f"start:{k}": v for k, v in starts.items()}, **dict(zip(ends, results))}


def _slopes(coordinate: np.ndarray) -> list[int | None]:
    """Per axis, the constant step of `coordinate` along it (None if not constant)."""
    steps = []
    for axis in range(coordinate.ndim):
        diff = np.diff(coordinate, axis=axis)
        steps.append(int(diff.flat[0]) if diff.size and np.all(diff == diff.flat[0]) else (0 if not diff.size else None))
    return steps


def _add(graph: ir.Graph, after: ir.Node | None, op: str, inputs, name: str, shape, dtype, **attributes) -> ir.Value:
    node = ir.node(op, inputs, attributes=attributes, name=name)
    node.outputs[0].name = f"{name}_out"
    node.outputs[0].shape, node.outputs[0].dtype = ir.Shape(shape), dtype
    if after is None:
        graph.insert_before(next(iter(graph)), node)
    else:
        graph.insert_after(after, node)
    return node.outputs[0]


def _constant(graph: ir.Graph, name: str, values) -> ir.Value:
    array = np.asarray(values, dtype=np.int64)
    value = ir.Value(name=name, const_value=ir.tensor(array), shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.INT64))
    graph.register_initializer(value)
    return value


def _split_into_heads(graph: ir.Graph, chain: _Chain, source: np.ndarray, moved: np.ndarray, tag: str) -> bool:
    """Replace a projection → operand chain by Slice → Reshape(.., H, d) → Transpose, if that is what it does."""
    coordinates = np.unravel_index(moved.astype(np.int64), source.shape)
    feature, rank = coordinates[-1], source.ndim
    slopes = _slopes(feature)
    if moved.ndim != rank + 1 or None in slopes or 1 not in slopes:
        return False
    dim_axis = slopes.index(1)
    head_dim = moved.shape[dim_axis]
    head_axes = [a for a, s in enumerate(slopes) if s == head_dim and a != dim_axis]
    if len(head_axes) != 1 or sum(1 for s in slopes if s) != 2:
        return False
    head_axis, heads = head_axes[0], moved.shape[head_axes[0]]
    offset, width = int(feature.flat[0]), heads * head_dim
    index = np.indices(moved.shape)
    perm = [0] * moved.ndim
    perm[head_axis], perm[dim_axis] = rank - 1, rank
    free = [a for a in range(moved.ndim) if a not in (head_axis, dim_axis)]
    for source_axis in range(rank - 1):
        matches = [a for a in free if np.array_equal(coordinates[source_axis], index[a])]
        if len(matches) != 1:
            return False
        perm[matches[0]] = source_axis
        free.remove(matches[0])
    start, dtype = chain.start, chain.start.dtype
    after = start.producer()
    x = start
    if (offset, width) != (0, source.shape[-1]):
        x = _add(graph, after, "Slice", [x, _constant(graph, f"{tag}_starts", [offset]), _constant(graph, f"{tag}_ends", [offset + width]),
                 _constant(graph, f"{tag}_axes", [-1])], f"{tag}_slice", list(start.shape)[:-1] + [width], dtype)
        after = x.producer()
    x = _add(graph, after, "Reshape", [x, _constant(graph, f"{tag}_shape", [0] * (rank - 1) + [heads, head_dim])],
             f"{tag}_split_heads", list(start.shape)[:-1] + [heads, head_dim], dtype)
    x = _add(graph, x.producer(), "Transpose", [x], f"{tag}_transpose", [x.shape[a] for a in perm], dtype, perm=perm)
    ir.convenience.replace_all_uses_with(chain.end, x)
    return True


def _merge_heads(graph: ir.Graph, chain: _Chain, context: np.ndarray, moved: np.ndarray, tag: str) -> bool:
    """Replace a context → output-projection chain by Transpose → Reshape([.., H*d]), if that is what it does."""
    coordinates = np.unravel_index(moved.astype(np.int64), context.shape)
    if context.ndim != 4 or moved.ndim < 2:
        return False
    head_dim = context.shape[-1]
    feature = np.indices(moved.shape)[-1]
    head_axes = [a for a in range(3) if np.array_equal(coordinates[a] * head_dim + coordinates[3], feature)]
    if len(head_axes) != 1:
        return False
    head_axis = head_axes[0]
    lead_shape = moved.shape[:-1]
    lead = np.ravel_multi_index(np.indices(moved.shape)[:-1], lead_shape) if lead_shape else np.zeros_like(feature)
    others = [a for a in range(3) if a != head_axis]
    for order in itertools.permutations(others):
        flat = np.ravel_multi_index([coordinates[a] for a in order], [context.shape[a] for a in order])
        if not np.array_equal(flat, lead):
            continue
        if len(lead_shape) == len(order) and all(moved.shape[i] == context.shape[a] for i, a in enumerate(order)):
            target = [0] * len(order) + [moved.shape[-1]]
        elif len(lead_shape) == 1:
            target = [-1, moved.shape[-1]]
        else:
            return False
        start, dtype = chain.start, chain.start.dtype
        shape = [start.shape[a] for a in (*order, head_axis, 3)]
        x = _add(graph, start.producer(), "Transpose", [start], f"{tag}_transpose", shape, dtype, perm=[*order, head_axis, 3])
        x = _add(graph, x.producer(), "Reshape", [x, _constant(graph, f"{tag}_shape", target)], f"{tag}_merge_heads",
                 list(chain.end.shape)[:-1] + [moved.shape[-1]], dtype)
        ir.convenience.replace_all_uses_with(chain.end, x)
        return True
    return False


def _reinfer_core_shapes(model: ir.Model) -> None:
    """Cores whose head count shape inference could not see (legacy exports reshape through targets computed
    at run time) have it now, from the canonical chains: their values' stale shapes are inferred again."""
    stale = []
    for core in find_attention_cores(model):
        shape = core.context.outputs[0].shape
        if shape is None or len(shape) != 4 or not isinstance(shape[1], int):
            value = core.softmax.inputs[0]
            while (node := value.producer()) is not None and node is not core.scores:
                stale.append(value)
                value = node.inputs[0]
            stale += [v for node in (core.scores, core.softmax, *core.guard, core.context) for v in node.outputs]
    for value in stale:
        value.shape = None
    if stale:
        common_passes.ShapeInferencePass(strict_mode=False)(model)


@dataclass
class CanonicalAttentionLayout(ir.passes.InPlacePass):
    """Transform: head split/merge chains of attention blocks as Slice/Reshape/Transpose the channel rules follow."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = _normalise_operands(model)
        if modified:
            common_passes.RemoveUnusedNodesPass()(model)
        chains = _chains(model)
        if not chains:
            return ir.passes.PassResult(model, modified)
        probed = _probe(model, chains)
        for number, chain in enumerate(chains):
            if chain.end.name not in probed:
                continue
            source, moved = probed[f"start:{chain.start.name}"], probed[chain.end.name]
            rewrite = _split_into_heads if chain.into_heads else _merge_heads
            modified |= rewrite(model.graph, chain, source, moved, f"pcc_attention{number}")
        if modified:
            common_passes.RemoveUnusedNodesPass()(model)
            _reinfer_core_shapes(model)
        return ir.passes.PassResult(model, modified)
