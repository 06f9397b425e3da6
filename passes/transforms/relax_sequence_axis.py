"""RelaxSequenceAxis: a transformer exported at a fixed length gets a symbolic sequence axis.

Token pruning shrinks the sequence at run time, so it needs a graph that works at any length; plain
`torch.onnx.export` at 128 tokens bakes 128 into the graph, and users often cannot re-export. Once the
inputs' sequence axis is made symbolic, the places where the length is still a constant are exactly the
nodes where the symbolic length meets a static one. Walking the graph in order, re-inferring each node's
output shapes (onnx's per-node inference), every node that reads a value with the symbolic length is
checked for constants that encode it, and these are rewritten:

- Reshape targets: an entry equal to the length where the reshaped input has the symbolic length at the
  same position becomes 0 ("copy it"); one other such entry becomes -1 (`x.view(L * b, ...)` merges);
- Expand targets: 1 where the expanded input has the symbolic length on that axis, else the length read
  from the input at run time (a [b, 1, 1, L] mask expanded to [b, 1, L, L]);
- Slice ends equal to the length on a symbolic axis: to the end;
- operands computed from constants alone, of broadcasting ops (a position embedding or token-type
  embedding [1, L, d], a causal or padding mask [.., L, L]) are sliced to the run-time length on the
  axes that line up with the symbolic one or that only they give a size to (a mask's query axis against a
  [.., 1, s] padding mask), and so are constant indices into a value with the symbolic
  length (transformers' masks gather the padding mask at arange(L)): everything a fixed-length export
  computes from constants alone is indexed by position, so its first n positions are what a length-n
  export would have computed.

The relaxed model runs at any length up to the export's (position tables hold that many positions); a
longer input fails in onnxruntime as it would in the exported model's framework. A constant is only
touched where it meets the symbolic length, so a weight whose hidden size happens to equal the length is
not mistaken for it. The length is taken from the attention: the size of a square softmax's
last two axes (scores [b, h, L, L]) that the inputs share on `axis`. The pass does nothing on a model whose
sequence axis is already symbolic, or without such attention (PruneTokens then says what is missing).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from pcc.compiler.errors import InvalidRequestError
from pcc.passes.analysis.channel_rules import SHAPE_PRESERVING_OPS
from pcc.passes.analysis.shapes import RelaxedSequence
from pcc.passes.results import store
from pcc.passes.transforms.prune_tokens import GraphBuilder

__all__ = ["RelaxSequenceAxis"]

# ops whose inputs broadcast against each other (numpy rules): a constant operand lines up from the right
_BROADCASTING = {
    "Add", "Sub", "Mul", "Div", "Pow", "Where", "Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual",
    "And", "Or", "Xor", "Max", "Min", "Mod", "BitShift", "Sum", "Mean",
}
_GATHERS = ("Gather", "GatherElements", "GatherND")
_END = np.iinfo(np.int64).max


def _attention_length(model: ir.Model) -> int | None:
    """The size of the last two axes of the square, rank-4 softmaxes (attention scores), if one size."""
    sizes = {
        node.outputs[0].shape[-1]
        for node in model.graph
        if node.op_type == "Softmax" and node.outputs[0].shape is not None and len(node.outputs[0].shape) == 4
        and isinstance(node.outputs[0].shape[-1], int) and node.outputs[0].shape[-1] == node.outputs[0].shape[-2]
    }
    return sizes.pop() if len(sizes) == 1 else None


class _Relaxer:
    def __init__(self, model: ir.Model, length: int, symbol: ir.SymbolicDim, source: ir.Value, axis: int) -> None:
        self.model, self.length, self.symbol = model, length, symbol
        self.build = GraphBuilder(model.graph, "pcc_relax")
        self.run_length = self._shape_tensor(self.build.dims(source, axis, axis + 1), 1)  # [L]
        self.sliced: dict[tuple[ir.Value, tuple[int, ...]], ir.Value] = {}
        self.rewritten: list[str] = []
        self._independent: dict[ir.Value, bool] = {}

    def carries(self, value: ir.Value | None) -> bool:
        return value is not None and value.shape is not None and self.symbol in value.shape.dims

    def relax(self, node: ir.Node) -> None:
        if not any(self.carries(v) for v in node.inputs):
            return
        if node.op_type == "Reshape":
            changed = self._reshape(node)
        elif node.op_type == "Expand":
            changed = self._expand(node)
        elif node.op_type == "Slice":
            changed = self._slice(node)
        elif node.op_type in _BROADCASTING:
            changed = self._broadcast(node)
        elif node.op_type in _GATHERS and self.carries(node.inputs[0]):
            changed = self._gather_positions(node)
        else:
            changed = False
        if changed:
            self.rewritten.append(node.name)

    def _const(self, node: ir.Node, index: int) -> np.ndarray | None:
        value = node.inputs[index] if index < len(node.inputs) else None
        return None if value is None or value.const_value is None else value.const_value.numpy()

    def _reshape(self, node: ir.Node) -> bool:
        target, x = self._const(node, 1), node.inputs[0]
        if target is None or self.length not in target or not self.carries(x):
            return False
        new = target.astype(np.int64).copy()
        for position, entry in enumerate(target):
            if entry == self.length and position < len(x.shape) and x.shape[position] == self.symbol:
                new[position] = 0
        rest = [p for p, e in enumerate(new) if e == self.length]
        if len(rest) > 1 or (rest and -1 in new):
            raise InvalidRequestError(
                f"cannot relax the sequence length of Reshape node '{node.name}' (target {target.tolist()}); "
                "export the model with a dynamic sequence axis"
            )
        new[rest] = -1
        node.replace_input_with(1, self.build.const(new))
        node.attributes.pop("allowzero", None)
        return True

    def _expand(self, node: ir.Node) -> bool:
        target, x = self._const(node, 1), node.inputs[0]
        if target is None or self.length not in target or x.shape is None:
            return False
        offset = len(target) - len(x.shape)
        pieces: list[ir.Value | int] = []
        for position, entry in enumerate(target):
            axis = position - offset
            if entry != self.length:
                pieces.append(int(entry))
            elif axis >= 0 and x.shape[axis] == self.symbol:
                pieces.append(1)  # broadcasting keeps the input's own (symbolic) length
            else:
                pieces.append(self.run_length)
        if all(isinstance(p, int) for p in pieces):
            node.replace_input_with(1, self.build.const(pieces))
        else:
            parts = [p if isinstance(p, ir.Value) else self.build.const([p]) for p in pieces]
            node.replace_input_with(1, self._shape_tensor(self.build.op("Concat", parts, axis=0), len(parts)))
        return True

    def _slice(self, node: ir.Node) -> bool:
        data, starts, ends = node.inputs[0], self._const(node, 1), self._const(node, 2)
        if starts is None or ends is None or data.shape is None:
            return False
        axes = self._const(node, 3)
        axes = np.arange(len(starts)) if axes is None else axes
        new = ends.astype(np.int64).copy()
        for i, axis in enumerate(axes):
            if data.shape[int(axis)] == self.symbol and starts[i] == 0 and ends[i] == self.length:
                new[i] = _END
        if np.array_equal(new, ends):
            return False
        node.replace_input_with(2, self.build.const(new))
        return True

    def _broadcast(self, node: ir.Node) -> bool:
        rank = max(len(v.shape) for v in node.inputs if v is not None and v.shape is not None)
        aligned = [None if v is None or v.shape is None else [None] * (rank - len(v.shape)) + list(v.shape)
                   for v in node.inputs]
        changed = False
        for index, value in enumerate(node.inputs):
            if aligned[index] is None or not self.independent(value):
                continue
            others = [dims for i, dims in enumerate(aligned) if i != index and dims is not None]
            offset = rank - len(value.shape)
            # an axis of the length that meets the symbolic length, or that only this operand gives its size
            # (a [.., L, L] mask broadcast against [.., 1, s]: its query axis sets the output's)
            axes = [a for a, d in enumerate(value.shape) if d == self.length and (
                any(dims[offset + a] == self.symbol for dims in others)
                or all(dims[offset + a] in (None, 1) for dims in others))]
            changed |= self._slice_prefix(node, index, axes)
        return changed

    def _gather_positions(self, node: ir.Node) -> bool:
        """Indices computed from constants alone (a mask gathered at arange(L)) are positions: their first n."""
        indices = node.inputs[1]
        if indices.shape is None or not self.independent(indices):
            return False
        return self._slice_prefix(node, 1, [a for a, d in enumerate(indices.shape) if d == self.length])

    def _slice_prefix(self, node: ir.Node, index: int, axes: list[int]) -> bool:
        """Replace input `index` by its first run-time-length entries on `axes` (one Slice per value and axes)."""
        if not axes:
            return False
        value = node.inputs[index]
        key = (value, tuple(axes))
        if key not in self.sliced:
            count = len(axes)
            sliced = self.build.op("Slice", [value, self.build.const([0] * count), self._lengths(count), self.build.const(axes)])
            sliced.dtype = value.dtype
            sliced.shape = ir.Shape([self.symbol if a in axes else d for a, d in enumerate(value.shape)])
            self.sliced[key] = sliced
        node.replace_input_with(index, self.sliced[key])
        return True

    def independent(self, value: ir.Value) -> bool:
        """Whether `value` is computed from constants only (no graph input reaches it)."""
        if value not in self._independent:
            producer = value.producer()
            if value.const_value is not None:
                self._independent[value] = True
            elif producer is None:
                self._independent[value] = False
            else:
                self._independent[value] = all(self.independent(v) for v in producer.inputs if v is not None)
        return self._independent[value]

    def _lengths(self, count: int) -> ir.Value:
        return self.run_length if count == 1 else self._shape_tensor(self.build.op("Concat", [self.run_length] * count, axis=0), count)

    @staticmethod
    def _shape_tensor(value: ir.Value, size: int) -> ir.Value:
        value.dtype, value.shape = ir.DataType.INT64, ir.Shape([size])
        return value

    def infer(self, node: ir.Node, opsets: dict[str, int]) -> None:
        """Re-infer `node`'s outputs from its inputs' (possibly now symbolic) shapes."""
        inputs = [v for v in node.inputs if v is not None]
        if not any(self.carries(v) for v in inputs):
            return
        try:
            if any(v.type is None for v in inputs):
                raise ValueError("untyped input")
            types = {}
            for value in inputs:
                proto = ir.serde.serialize_type(value.type)
                if value.shape is not None:
                    ir.serde.serialize_shape_into(proto, value.shape)
                types[value.name] = proto
            data = {v.name: ir.serde.serialize_tensor(v.const_value) for v in inputs
                    if v.const_value is not None and v.const_value.size <= 64}
            schema = onnx.defs.get_schema(node.op_type, opsets.get(node.domain, 1), node.domain)
            inferred = onnx.shape_inference.infer_node_outputs(schema, ir.serde.serialize_node(node), types, data)
        except Exception:  # function ops (LayerNormalization-17 in some onnx versions), unknown domains
            inferred = {}
        for output in node.outputs:
            if output.name in inferred:
                output.shape = ir.serde.deserialize_type_proto_for_shape(inferred[output.name])
            elif node.op_type in SHAPE_PRESERVING_OPS and output is node.outputs[0]:
                output.shape = node.inputs[0].shape
            elif output.shape is not None:
                output.shape = None  # a stale static length is worse than no shape


@dataclass
class RelaxSequenceAxis(ir.passes.InPlacePass):
    """Transform: the inputs' `axis` (a fixed sequence length) becomes the symbolic `name`, and the constants
    that encode the length are rewritten so that the graph runs at any length."""

    axis: int = 1
    name: str = "sequence"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        length = _attention_length(model)
        inputs = [v for v in model.graph.inputs if v.shape is not None and len(v.shape) > self.axis
                  and v.shape[self.axis] == length]
        if length is None or not inputs:
            return ir.passes.PassResult(model, False)
        common_passes.TopologicalSortPass()(model)
        symbol = ir.SymbolicDim(self.name)
        for value in inputs:
            value.shape = ir.Shape([symbol if a == self.axis else d for a, d in enumerate(value.shape)])
        relaxer = _Relaxer(model, length, symbol, inputs[0], self.axis)
        opsets = dict(model.opset_imports)
        for node in list(model.graph):
            relaxer.relax(node)
            relaxer.infer(node, opsets)
        stuck = [n for n in model.graph if n.op_type == "Softmax" and n.outputs[0].shape is not None
                 and len(n.outputs[0].shape) == 4 and n.outputs[0].shape[-1] != symbol]
        if stuck:
            raise InvalidRequestError(
                f"cannot make the sequence length ({length}) of this fixed-length export symbolic: attention Softmax "
                f"node '{stuck[0].name}' still sees {stuck[0].outputs[0].shape}; export with a dynamic sequence axis"
            )
        common_passes.TopologicalSortPass()(model)
        store(model, RelaxedSequence(length, [v.name for v in inputs], relaxer.rewritten))
        return ir.passes.PassResult(model, True)
