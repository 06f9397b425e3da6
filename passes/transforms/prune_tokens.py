"""PruneTokens: SpAtten's cascade token pruning, written into the graph as ordinary ONNX ops.

After the softmax of attention layer l, every token's score grows by the attention it received: the sum
over heads and queries of the probabilities P[b, h, i, j] (SpAtten, HPCA'21). Scores accumulate across
layers. Before layer l+1 the top-k tokens by accumulated score survive, in their original order, and
every later layer works on them only: the hidden states, the accumulated scores, the positions of the
survivors in the input, and each later layer's attention mask are gathered (TopK + GatherElements).
So later layers' projections, attention and FFN shrink at run time, which is a real CPU speed-up on
long inputs, not FLOPs on paper.

Rules:
- k is a fraction of the *input* length, floor(L * keep[l]), at least 1 (and never more than the tokens
  that reached the layer: the schedule is non-increasing).
- The first token ([CLS], which classifiers read) is always kept.
- Padding receives no attention (its keys are masked to zero probability), so its score stays lowest and
  it goes first. Within a batch each sequence keeps its own tokens; all keep the same count.
- Masks are gathered from the original mask by the survivors' input positions, so padding and causal
  masks stay exact.

Outputs that carry a token axis come back with the survivors only; `keep=1` everywhere reproduces the
dense model exactly. The model must have a symbolic sequence length: a graph with the length baked into
its constants cannot shrink. A fixed-length export gets one from RelaxSequenceAxis
(`relax_sequence_axis.py`), which the pipelines run before this pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from pcc.compiler.errors import InvalidRequestError
from pcc.passes.analysis.attention import MOVEMENT_OPS, AttentionBlock, AttentionBlocks
from pcc.passes.results import fetch, invalidate, store
from pcc.passes.transforms.static_reshape_targets import shape_entries

__all__ = [
    "GraphBuilder", "PruneTokens", "TokenPruneReport", "cascade_keep_schedule", "resolve_cascade_schedule",
    "token_keep_schedule",
]

_FIRST_TOKEN_BONUS = 1e9  # above any accumulated score: a sum of probabilities, at most heads x queries x layers


TOKENS_UNPRUNED = 0.15  # SpAtten prunes no tokens in the first 15% of the layers


def token_keep_schedule(layers: int, sparsity: float) -> list[float]:
    """SpAtten's token schedule: no pruning in the first ceil(15%) of the layers, then a ramp."""
    return cascade_keep_schedule(layers, sparsity, TOKENS_UNPRUNED)


def cascade_keep_schedule(layers: int, sparsity: float, unpruned: float) -> list[float]:
    """SpAtten's schedule: the fraction kept in each layer (of the input's tokens, or of the heads).

    No pruning in the first ceil(`unpruned` x layers) layers (at least the first: scores come from its
    attention), then a linear ramp whose start and end average to what the remaining layers must keep so
    that the mean over *all* layers removes `sparsity`. The ramp starts at 1.5x that average (at most 1)
    so that the last layers keep something even at high sparsity.
    """
    if not 0 <= sparsity < 1:
        raise InvalidRequestError(f"cascade sparsity must be in [0, 1), got {sparsity}")
    if layers < 1:
        raise InvalidRequestError("cascade pruning needs at least one attention layer")
    full = max(1, math.ceil(unpruned * layers))
    ramp = layers - full
    if sparsity == 0 or ramp == 0:
        if sparsity > 0:
            raise InvalidRequestError(f"{layers} attention layer(s) leave no layer to prune in")
        return [1.0] * layers
    average = 1 - sparsity * layers / ramp
    if average <= 0:
        raise InvalidRequestError(
            f"sparsity {sparsity} is out of reach: the first {full} of {layers} layers keep everything"
        )
    start = min(1.0, 1.5 * average)
    end = 2 * average - start
    steps = [start + (end - start) * i / (ramp - 1) if ramp > 1 else average for i in range(ramp)]
    return [1.0] * full + steps


def resolve_cascade_schedule(
    keep: tuple[float, ...] | None, sparsity: float | None, layers: int, unpruned: float, what: str
) -> list[float]:
    """The per-layer keep fractions a cascade pass runs with: `keep` as given (checked), else the schedule."""
    schedule = list(keep) if keep is not None else cascade_keep_schedule(layers, sparsity, unpruned)
    if len(schedule) != layers or schedule[0] != 1 or any(not 0 < k <= 1 for k in schedule) or any(
        b > a for a, b in zip(schedule, schedule[1:])
    ):
        raise InvalidRequestError(
            f"a {what} schedule is one non-increasing keep fraction in (0, 1] per attention layer ({layers}), "
            f"starting at 1; got {schedule}"
        )
    return schedule


@dataclass
class TokenPruneReport:
    META_KEY = "pcc.token_prune_report"
    PRODUCED_BY = "PruneTokens"

    keep: list[float]  # fraction of the input's tokens each attention layer sees
    layer_inputs: list[str | None]  # per layer, the gathered stream it reads (None where nothing was pruned)

    @property
    def sparsity(self) -> float:
        return 1 - float(np.mean(self.keep))

    def summary(self) -> str:
        ratios = " ".join(f"{k:.2f}" for k in self.keep)
        return f"tokens kept per layer (of the input's): {ratios}; average removed {100 * self.sparsity:.1f}%"


class GraphBuilder:
    """Appends nodes to a graph (`TopologicalSortPass` puts them in place afterwards); the cascade passes'
    way of writing their run-time selection logic."""

    def __init__(self, graph: ir.Graph, prefix: str):
        self.graph, self.prefix, self.count = graph, prefix, 0

    def op(self, op_type: str, inputs, **attributes) -> ir.Value:
        self.count += 1
        name = f"{self.prefix}_{op_type}_{self.count}"
        node = ir.node(op_type, inputs, attributes=attributes, name=name)
        node.outputs[0].name = name
        self.graph.append(node)
        return node.outputs[0]

    def op_multi(self, op_type: str, inputs, outputs: int, **attributes) -> list[ir.Value]:
        self.count += 1
        name = f"{self.prefix}_{op_type}_{self.count}"
        node = ir.node(op_type, inputs, attributes=attributes, name=name, num_outputs=outputs)
        for i, out in enumerate(node.outputs):
            out.name = f"{name}_{i}"
        self.graph.append(node)
        return list(node.outputs)

    def dims(self, value: ir.Value, start: int, end: int | None = None) -> ir.Value:
        """`Shape(value)[start:end]` as a 1-D int64 tensor. Shape's own start/end attributes need opset 15, and
        converters' files are often older, so the slice is a Slice node."""
        bounds = [self.const([start]), self.const([end if end is not None else np.iinfo(np.int64).max])]
        return self.op("Slice", [self.op("Shape", [value]), *bounds])

    def const(self, values, dtype=np.int64) -> ir.Value:
        self.count += 1
        array = np.asarray(values, dtype=dtype)
        value = ir.Value(name=f"{self.prefix}_const_{self.count}", const_value=ir.tensor(array),
                         shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)))
        self.graph.register_initializer(value)
        return value

    def top_in_order(self, scores: ir.Value, count: ir.Value) -> ir.Value:
        """Indices of the `count` highest scores along axis 1, in ascending order (survivors keep their order)."""
        _, chosen = self.op_multi("TopK", [scores, count], 2, axis=1, largest=1, sorted=1)
        return self.op_multi("TopK", [chosen, count], 2, axis=1, largest=0, sorted=1)[0]

    def gather_tokens(self, data: ir.Value, positions: ir.Value, rank: int, token_axis: int, batch_axis: int) -> ir.Value:
        """data[.., positions[b, :], ..] along `token_axis`, one row of positions per batch element.

        With a batch of one (static) a plain Gather does it: GatherElements needs an index as large as
        its output, which for a KV cache costs more than the attention it saves."""
        if data.shape is not None and data.shape[batch_axis] == 1:
            return self.op("Gather", [data, self.op("Squeeze", [positions, self.const([0])])], axis=token_axis)
        index = positions if batch_axis < token_axis else self.op("Transpose", [positions], perm=[1, 0])
        others = [a for a in range(rank) if a not in (token_axis, batch_axis)]
        if others:
            index = self.op("Unsqueeze", [index, self.const(others)])
        data_shape = self.op("Shape", [data])
        target = self.op("ScatterElements", [data_shape, self.const([token_axis]), self.dims(positions, 1, 2)])
        index = self.op("Expand", [index, target])
        return self.op("GatherElements", [data, index], axis=token_axis)


@dataclass(frozen=True)
class _Layer:
    block: AttentionBlock
    stream: ir.Value  # the residual stream the layer reads (what gets gathered before it)
    stream_uses: tuple[tuple[ir.Node, int], ...]
    probabilities: ir.Value  # [batch, heads, queries, keys]
    mask_use: tuple[ir.Node, int] | None  # where the layer's mask enters its scores
    token_axis: int
    batch_axis: int


def _stream_of(block: AttentionBlock, nodes: dict[str, ir.Node]) -> ir.Value:
    """The residual stream into the layer: the skip input of its residual Add, which the Q projection reads
    directly, through a LayerNorm (pre-norm) or through data movement (nn.MultiheadAttention's seq-first
    transpose)."""
    value = nodes[block.query].inputs[0]
    candidates = [value]
    while (node := value.producer()) is not None and (node.op_type in MOVEMENT_OPS or node.op_type == "LayerNormalization"):
        value = node.inputs[0]
        candidates.append(value)
    if block.residual is not None:
        for value in nodes[block.residual].inputs:
            if value in candidates:
                return value
    return candidates[0]


def _mask_use(block: AttentionBlock, nodes: dict[str, ir.Node]) -> tuple[ir.Node, int] | None:
    if block.mask is None:
        return None
    node = nodes[block.softmax].inputs[0].producer()
    for _ in range(3):  # the mask node sits right before the softmax, or before a scaling of the scores
        if node is None:
            break
        for index, value in enumerate(node.inputs):
            if value is not None and value.name == block.mask:
                return node, index
        node = node.inputs[0].producer()
    raise InvalidRequestError(f"token pruning: cannot find where the mask {block.mask} enters attention {block.name}")


def _axis_of(shape: ir.Shape, dim) -> int | None:
    matches = [a for a, d in enumerate(shape.dims) if d == dim]
    return matches[0] if len(matches) == 1 else None


def _layers(model: ir.Model, blocks: list[AttentionBlock]) -> list[_Layer]:
    nodes = {n.name: n for n in model.graph}
    values = {v.name: v for n in model.graph for v in n.outputs}
    layers = []
    for block in blocks:
        if block.fused_op or block.query is None or block.probabilities is None:
            raise InvalidRequestError(f"token pruning cannot rewrite attention {block.name} (fused or without a Q projection)")
        probabilities = values[block.probabilities]
        shape = probabilities.shape
        if shape is None or len(shape) != 4 or not isinstance(shape[-1], ir.SymbolicDim) or shape[-1].value is None:
            raise InvalidRequestError(
                f"token pruning needs a symbolic sequence length, but attention {block.name} has probabilities of "
                f"shape {shape}: run RelaxSequenceAxis first, or export with a dynamic sequence axis "
                "(from_torch(..., dynamic_sequence=True))"
            )
        stream = _stream_of(block, nodes)
        token_axis = _axis_of(stream.shape, shape[-1]) if stream.shape is not None else None
        batch_axis = _axis_of(stream.shape, shape[0]) if stream.shape is not None else None
        if token_axis is None or batch_axis is None:
            raise InvalidRequestError(
                f"token pruning: cannot tell the token and batch axes of {stream.name} (shape {stream.shape}) "
                f"from attention {block.name}'s probabilities {shape}"
            )
        uses = tuple((use.node, use.idx) for use in stream.uses())
        layers.append(_Layer(block, stream, uses, probabilities, _mask_use(block, nodes), token_axis, batch_axis))
    return layers


def _gather_mask(build: GraphBuilder, mask: ir.Value, positions: ir.Value, batch: ir.Value, token_dim) -> ir.Value:
    """The mask at the survivors' input positions, on every axis of the input's length (keys; queries too
    for [b, 1, L, L] masks). A mask without a batch axis is broadcast to the batch first."""
    shape = mask.shape
    if shape is None:
        raise InvalidRequestError(f"token pruning needs the shape of the attention mask {mask.name}")
    if len(shape) != 4:
        raise InvalidRequestError(f"token pruning expects a [batch, heads, queries, keys] mask, {mask.name} is {shape}")
    mask = build.op("Expand", [mask, build.op("Concat", [batch, build.const([1, 1, 1])], axis=0)])
    for axis in (2, 3):
        if shape[axis] == token_dim:
            mask = build.gather_tokens(mask, positions, 4, axis, 0)
    return mask


def _reachable(starts: list[ir.Value]) -> list[ir.Value]:
    seen: dict[ir.Value, None] = {}
    stack = list(starts)
    while stack:
        value = stack.pop()
        if value not in seen:
            seen[value] = None
            stack.extend(out for use in value.uses() for out in use.node.outputs)
    return list(seen)


def _retarget_reshapes(build: GraphBuilder, downstream: list[ir.Value], token_dim: ir.SymbolicDim) -> None:
    """Exporters compute reshape targets from the *input's* length (`x.size(1)`); after a gather that length is
    stale. Where a run-time target holds the length once and no -1, that entry becomes -1 (inferred)."""
    for node in {use.node for value in downstream for use in value.uses()}:
        if node.op_type != "Reshape" or node.inputs[1].const_value is not None:
            continue
        entries = shape_entries(node.inputs[1])
        if entries is None or token_dim not in entries:
            continue
        if entries.count(token_dim) != 1 or -1 in entries:
            raise InvalidRequestError(
                f"token pruning cannot retarget Reshape node {node.name}: its target {entries} uses the sequence length "
                "in a way that cannot be inferred"
            )
        target = build.op("ScatterElements", [node.inputs[1], build.const([entries.index(token_dim)]), build.const([-1])])
        node.replace_input_with(1, target)


def _forget_token_length(downstream: list[ir.Value], token_dim: ir.SymbolicDim) -> None:
    """Values downstream of a gather no longer have the input's length: a stale symbolic length would tell
    onnxruntime two different sizes are one (it warns and cannot plan buffers). Graph outputs get the name
    `kept_tokens`, intermediate values an anonymous length."""
    for value in downstream:
        if value.shape is not None and token_dim in value.shape.dims:
            name = "kept_tokens" if value.is_graph_output() else None
            value.shape = ir.Shape([ir.SymbolicDim(name) if d == token_dim else d for d in value.shape.dims])


@dataclass
class PruneTokens(ir.passes.InPlacePass):
    """Transform: cascade token pruning with `sparsity` of the tokens removed on average over the attention
    layers (SpAtten's schedule), or an explicit per-layer `keep` schedule (fractions of the input length)."""

    sparsity: float | None = None
    keep: tuple[float, ...] | None = None
    expose_positions: bool = False  # add an output `kept_token_positions`: where each survivor was in the input
    report: TokenPruneReport | None = field(default=None, init=False)

    def requires(self, model: ir.Model) -> None:
        if (self.sparsity is None) == (self.keep is None):
            raise InvalidRequestError("PruneTokens takes exactly one of sparsity or keep")
        fetch(model, AttentionBlocks)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        blocks = fetch(model, AttentionBlocks).blocks
        if not blocks:
            raise InvalidRequestError("token pruning needs multi-head attention, but the model has no attention block")
        keep = resolve_cascade_schedule(self.keep, self.sparsity, len(blocks), TOKENS_UNPRUNED, "token")
        layers = _layers(model, blocks)
        changed = any(k < 1 for k in keep)
        layer_inputs: list[str | None] = [None] * len(layers)
        if changed or self.expose_positions:
            layer_inputs = self._rewrite(model, layers, keep)
            common_passes.RemoveUnusedNodesPass()(model)
            common_passes.TopologicalSortPass()(model)
        invalidate(model, AttentionBlocks)
        self.report = TokenPruneReport(keep, layer_inputs)
        store(model, self.report)
        return ir.passes.PassResult(model, changed)

    def _rewrite(self, model: ir.Model, layers: list[_Layer], keep: list[float]) -> list[str | None]:
        build = GraphBuilder(model.graph, "pcc_tokens")
        first = layers[0]
        token_dim = first.probabilities.shape[-1]
        shape = build.op("Shape", [first.stream])
        length = build.op("Gather", [shape, build.const([first.token_axis])], axis=0)
        batch = build.op("Gather", [shape, build.const([first.batch_axis])], axis=0)
        length_float = build.op("Cast", [length], to=ir.DataType.FLOAT)
        positions = build.op("Range", [build.const(0), build.op("Squeeze", [length]), build.const(1)])
        positions = build.op("Expand", [build.op("Unsqueeze", [positions, build.const([0])]),
                                        build.op("Concat", [batch, build.const([1])], axis=0)])
        scores, gathered_values, layer_inputs = None, [], []
        for index, (layer, ratio) in enumerate(zip(layers, keep)):
            pruned_here = index > 0 and ratio < keep[index - 1]
            if pruned_here:
                survivors = self._top_tokens(build, scores, length_float, ratio)
                gathered = build.gather_tokens(layer.stream, survivors, len(layer.stream.shape), layer.token_axis, layer.batch_axis)
                for node, position in layer.stream_uses:
                    node.replace_input_with(position, gathered)
                gathered_values.append(gathered)
                scores = build.gather_tokens(scores, survivors, 2, 1, 0)
                positions = build.gather_tokens(positions, survivors, 2, 1, 0)
            layer_inputs.append(gathered_values[-1].name if pruned_here else None)
            if ratio < 1 and layer.mask_use is not None:
                node, position = layer.mask_use
                node.replace_input_with(position, _gather_mask(build, node.inputs[position], positions, batch, token_dim))
            if any(k < ratio for k in keep[index + 1 :]):  # a later layer prunes: accumulate this layer's attention
                received = build.op("ReduceSum", [layer.probabilities, build.const([1, 2])], keepdims=0)
                scores = received if scores is None else build.op("Add", [scores, received])
        if self.expose_positions:
            positions.name, positions.dtype = "kept_token_positions", ir.DataType.INT64
            positions.shape = ir.Shape([first.probabilities.shape[0], token_dim])  # renamed to kept_tokens below
            model.graph.outputs.append(positions)
            gathered_values.append(positions)
        downstream = _reachable(gathered_values)
        _retarget_reshapes(build, downstream, token_dim)
        _forget_token_length(downstream, token_dim)
        return layer_inputs


    @staticmethod
    def _top_tokens(build: GraphBuilder, scores: ir.Value, length_float: ir.Value, ratio: float) -> ir.Value:
        """Positions (ascending) of the top floor(L * ratio) tokens by score, the first token always among them."""
        count = build.op("Floor", [build.op("Mul", [length_float, build.const([ratio], np.float32)])])
        count = build.op("Max", [build.op("Cast", [count], to=ir.DataType.INT64), build.const([1])])
        first = build.op("Slice", [scores, build.const([0]), build.const([1]), build.const([1])])
        rest = build.op("Slice", [scores, build.const([1]), build.const([np.iinfo(np.int64).max]), build.const([1])])
        marked = build.op("Concat", [build.op("Add", [first, build.const(_FIRST_TOKEN_BONUS, np.float32)]), rest], axis=1)
        return build.top_in_order(marked, count)
