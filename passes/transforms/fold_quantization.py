"""FoldQuantization, RestoreQuantization: prune a QDQ-quantized model as the float model it stands for.

onnxruntime's static quantizer (QDQ format) keeps each weight as an integer initializer behind a
DequantizeLinear, and puts a QuantizeLinear → DequantizeLinear pair on the activations between float
ops. Channel rules, importance scores, attention patterns and reconstruction all read float weights and
float op chains, so on such a file nothing is prunable (smart-turn-v3 had 192 quantization ops and no
group). `FoldQuantization` therefore lifts the model to float before the analyses: each dequantized
integer weight becomes the float initializer it stands for (the same values onnxruntime computes), and
each per-tensor activation pair is bypassed. It records what it lifted (`FoldedQuantization`), and
`RestoreQuantization`, after pruning, quantizes the result again:

- a weight gets its own integer type, zero point and scales back, per-channel scales sliced to the
  channels pruning kept (`RecordKeptChannels` tracks them). Weights nothing re-fitted come back as the
  same integers; a re-fitted weight is rounded on the same scales, and a channel whose new values would
  overflow its integer range gets a wider scale;
- an activation pair is put back on the same tensor with the same scale, in front of the readers that
  had it, where both still exist (a removed block's activations are gone with it).

So a model with nothing removed comes back as it came in, and a pruned one is as quantized as its input.
Forms left alone (and so still stopping the channels, with `quantized_model_hint`'s advice): per-axis
activation scales, blocked or 4-bit quantization, integer ops (QLinearConv, MatMulInteger).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from pcc.passes.analysis.quantization import ActivationQuantization, FoldedQuantization, WeightQuantization
from pcc.passes.results import lookup, store

__all__ = ["FoldQuantization", "RestoreQuantization"]

_INTEGER_TYPES = {
    ir.DataType.INT8, ir.DataType.UINT8, ir.DataType.INT16, ir.DataType.UINT16, ir.DataType.INT32,
}


def _constant(value: ir.Value | None) -> np.ndarray | None:
    return None if value is None or value.const_value is None else value.const_value.numpy()


def _axis(node: ir.Node, rank: int) -> int:
    axis = node.attributes.get_int("axis", 1)
    return axis + rank if axis < 0 else axis


def _broadcast(values: np.ndarray, axis: int | None, rank: int) -> np.ndarray:
    """Per-channel `values` shaped to broadcast along `axis` of a rank-`rank` tensor (per tensor: a scalar)."""
    if axis is None:
        return values.reshape(-1)[0]
    shape = [1] * rank
    shape[axis] = -1
    return values.reshape(shape)


def _quantization_parameters(node: ir.Node, rank: int | None) -> tuple[np.ndarray, np.ndarray, int | None] | None:
    """(scale, zero point, axis or None) of a Quantize/DequantizeLinear with constant parameters and no block
    size, or None where they are not constant, the quantization is blocked, or it is per axis on a tensor of
    unknown rank."""
    if node.attributes.get_int("block_size", 0):
        return None
    scale = _constant(node.inputs[1])
    zero_value = node.inputs[2] if len(node.inputs) > 2 else None
    zero_point = _constant(zero_value)
    if scale is None or (zero_value is not None and zero_point is None):
        return None
    if zero_point is None:  # absent: uint8 zero, or the output_dtype a QuantizeLinear names
        zero_point = np.zeros(scale.shape, dtype=np.uint8)
    if scale.size > 1 and rank is None:
        return None
    axis = _axis(node, rank) if scale.size > 1 else None
    return scale, zero_point, axis


@dataclass
class FoldQuantization(ir.passes.InPlacePass):
    """Transform: integer weights behind DequantizeLinear become float initializers, per-tensor activation
    Quantize → Dequantize pairs are bypassed; both recorded (`FoldedQuantization`) for `RestoreQuantization`."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        folded = FoldedQuantization()
        for node in list(graph):
            if node.op_type == "DequantizeLinear" and node.domain in ("", "ai.onnx"):
                weight = self._fold_weight(graph, node)
                if weight is not None:
                    folded.weights.append(weight)
            elif node.op_type == "QuantizeLinear" and node.domain in ("", "ai.onnx"):
                folded.activations += self._bypass_pair(graph, node)
        if not folded.weights and not folded.activations:
            return ir.passes.PassResult(model, modified=False)
        store(model, folded)
        return ir.passes.PassResult(model, modified=True)

    @staticmethod
    def _fold_weight(graph: ir.Graph, node: ir.Node) -> WeightQuantization | None:
        integer, output = node.inputs[0], node.outputs[0]
        if (
            integer is None or not integer.is_initializer() or integer.is_graph_input() or integer.const_value is None
            or integer.dtype not in _INTEGER_TYPES or output.is_graph_output()
        ):
            return None
        values = integer.const_value.numpy()
        parameters = _quantization_parameters(node, values.ndim)
        if parameters is None:
            return None
        scale, zero_point, axis = parameters
        # what DequantizeLinear computes: (q - zero point) * scale, in the scale's type
        dequantized = (values.astype(np.int64) - _broadcast(zero_point, axis, values.ndim)).astype(scale.dtype)
        dequantized = dequantized * _broadcast(scale, axis, values.ndim)
        zero_input = node.inputs[2] if len(node.inputs) > 2 else None
        record = WeightQuantization(
            name=output.name, node=node.name, integer=integer.name, scale_name=node.inputs[1].name,
            zero_point_name=None if zero_input is None else zero_input.name,
            scale=scale, zero_point=zero_point.astype(values.dtype), axis=axis,
        )
        weight = ir.Value(
            name=f"{output.name}__float", shape=ir.Shape(values.shape), type=ir.TensorType(ir.DataType.from_numpy(scale.dtype)),
            const_value=ir.tensor(dequantized, name=output.name),
        )
        ir.convenience.replace_all_uses_with(output, weight)
        _remove_with_unused_parameters(graph, node)
        weight.name = output.name
        graph.register_initializer(weight)
        return record

    @staticmethod
    def _bypass_pair(graph: ir.Graph, quantize: ir.Node) -> list[ActivationQuantization]:
        """Bypass a QuantizeLinear on a float activation whose every reader is a DequantizeLinear with the same
        per-tensor parameters (onnxruntime puts one Dequantize per reader, or one for all)."""
        source, quantized = quantize.inputs[0], quantize.outputs[0]
        if source is None or source.const_value is not None or quantized.is_graph_output():
            return []
        rank = None if source.shape is None else len(source.shape)  # imported files may carry no inferred shapes
        parameters = _quantization_parameters(quantize, rank)
        readers = [node for node, _ in quantized.uses()]
        if parameters is None or parameters[2] is not None or not readers:
            return []
        scale, zero_point, _ = parameters
        for reader in readers:
            theirs = _quantization_parameters(reader, rank) if reader.op_type == "DequantizeLinear" else None
            if (
                theirs is None or theirs[2] is not None
                or not np.array_equal(theirs[0], scale) or not np.array_equal(theirs[1], zero_point)
            ):
                return []
        outputs = [reader.outputs[0] for reader in readers if reader.outputs[0].is_graph_output()]
        if outputs and (len(outputs) > 1 or source.is_graph_input() or source.is_graph_output()):
            return []
        zero_input = quantize.inputs[2] if len(quantize.inputs) > 2 else None
        zero_dtype = zero_input.const_value.numpy().dtype if zero_input is not None else np.uint8
        records = []
        for reader in readers:
            dequantized = reader.outputs[0]
            uses = tuple((node.name, index) for node, index in dequantized.uses())
            output_name = dequantized.name if dequantized.is_graph_output() else None
            records.append(ActivationQuantization(
                value=source.name, quantize=quantize.name, dequantize=reader.name, scale=scale,
                zero_point=zero_point.astype(zero_dtype), quantize_attributes=tuple(quantize.attributes.values()),
                readers=uses, graph_output=output_name,
            ))
            if output_name is not None:  # the model's output keeps its name: the float tensor takes it
                graph.outputs[graph.outputs.index(dequantized)] = source
            ir.convenience.replace_all_uses_with(dequantized, source)
            _remove_with_unused_parameters(graph, reader)
            if output_name is not None:
                source.name = output_name
        _remove_with_unused_parameters(graph, quantize)
        return records


def _remove_with_unused_parameters(graph: ir.Graph, node: ir.Node) -> None:
    """Remove `node`, and the initializers only it read (restoring recreates them)."""
    parameters = [v for v in node.inputs[1:] + node.inputs[:1] if v is not None and v.is_initializer() and not v.is_graph_input()]
    graph.remove(node, safe=True)
    for value in parameters:
        if not value.uses() and value.name in graph.initializers:
            graph.initializers.pop(value.name)


@dataclass
class RestoreQuantization(ir.passes.InPlacePass):
    """Transform: quantize again what `FoldQuantization` lifted (see the module docstring); nothing to do
    on a model that was not quantized."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        folded = lookup(model, FoldedQuantization)
        if folded is None:
            return ir.passes.PassResult(model, modified=False)
        graph = model.graph
        names = _Names(graph)
        weights = sum(self._restore_weight(graph, names, folded, weight) for weight in folded.weights)
        pairs = sum(self._restore_pair(graph, names, activation) for activation in folded.activations)
        folded.restored = (weights, pairs)
        return ir.passes.PassResult(model, modified=weights + pairs > 0)

    @staticmethod
    def _restore_weight(graph: ir.Graph, names: _Names, folded: FoldedQuantization, record: WeightQuantization) -> bool:
        weight = graph.initializers.get(record.name)
        if weight is None or weight.const_value is None or weight.is_graph_output():
            return False  # removed with its layer, or replaced (a factorised weight stays float)
        values = weight.const_value.numpy()
        scale, zero_point = record.scale, record.zero_point
        if record.axis is not None:
            if record.axis >= values.ndim:
                return False
            kept = folded.kept_along(record.name, record.axis, values.shape[record.axis])
            if len(kept) != values.shape[record.axis] or (len(kept) and kept.max() >= scale.size):
                return False  # its channels changed in a way nothing recorded: leave it float
            scale, zero_point = scale.reshape(-1)[kept], zero_point.reshape(-1)[kept]
        integers, used_scale = _quantize(values, scale.reshape(-1), zero_point.reshape(-1), record.axis)
        scale = used_scale.reshape(scale.shape)
        node = ir.Node(
            "", "DequantizeLinear",
            [
                names.initializer(record.integer, ir.tensor(integers)),
                names.initializer(record.scale_name, ir.tensor(scale.astype(record.scale.dtype))),
                *([] if record.zero_point_name is None else [names.initializer(record.zero_point_name, ir.tensor(zero_point))]),
            ],
            attributes=[ir.AttrInt64("axis", record.axis)] if record.axis is not None else [],
            name=names.node(record.node),
        )
        output = node.outputs[0]
        output.shape, output.type = ir.Shape(values.shape), weight.type
        ir.convenience.replace_all_uses_with(weight, output)
        graph.initializers.pop(record.name)
        output.name = record.name
        first = next(iter(graph), None)
        if first is None:
            graph.append(node)
        else:
            graph.insert_before(first, node)
        return True

    @staticmethod
    def _restore_pair(graph: ir.Graph, names: _Names, record: ActivationQuantization) -> int:
        source = names.value(record.graph_output or record.value)
        if source is None or (record.graph_output is not None and not source.is_graph_output()):
            return 0
        nodes = {node.name: node for node in graph}
        readers = [
            (nodes[name], index) for name, index in record.readers
            if name in nodes and index < len(nodes[name].inputs) and nodes[name].inputs[index] is source
        ]
        if not readers and record.graph_output is None:
            return 0
        existing = nodes.get(record.quantize)
        if existing is not None and existing.op_type == "QuantizeLinear" and existing.inputs[0] is source:
            quantize, added = existing, []  # an earlier reader of the same pair put it back already
            scale, zero_point = existing.inputs[1], existing.inputs[2]
        else:
            scale = names.initializer(f"{record.quantize}_scale", ir.tensor(record.scale))
            zero_point = names.initializer(f"{record.quantize}_zero_point", ir.tensor(record.zero_point))
            quantize = ir.Node("", "QuantizeLinear", [source, scale, zero_point], attributes=list(record.quantize_attributes),
                               name=names.node(record.quantize))
            quantize.outputs[0].shape = source.shape
            quantize.outputs[0].type = ir.TensorType(ir.DataType.from_numpy(record.zero_point.dtype))
            added = [quantize]
        dequantize = ir.Node("", "DequantizeLinear", [quantize.outputs[0], scale, zero_point], name=names.node(record.dequantize))
        dequantize.outputs[0].shape, dequantize.outputs[0].type = source.shape, source.type
        for reader, index in readers:
            reader.replace_input_with(index, dequantize.outputs[0])
        if record.graph_output is not None:  # the output's name goes back to the dequantized tensor
            graph.outputs[graph.outputs.index(source)] = dequantize.outputs[0]
            source.name, dequantize.outputs[0].name = record.value, record.graph_output
        producer = source.producer()
        if producer is not None:
            graph.insert_after(quantize if not added else producer, [*added, dequantize])
        else:
            graph.insert_before(next(iter(graph)), [*added, dequantize])
        return 1


def _quantize(values: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """`values` as integers of the zero point's type on `scale` (widened per channel where they would
    overflow), and the scale used."""
    info = np.iinfo(zero_point.dtype)
    zero = _broadcast(zero_point, axis, values.ndim).astype(np.float64)
    reduce = tuple(a for a in range(values.ndim) if a != axis)
    ratio = values.astype(np.float64) / _broadcast(scale, axis, values.ndim)
    # how much wider each scale must be for its values to fit: q = v / s + z within [min, max]
    over = np.maximum(
        np.where(ratio > 0, ratio / np.maximum(info.max - zero, 1), 0.0),
        np.where(ratio < 0, ratio / np.minimum(info.min - zero, -1), 0.0),
    )
    widen = np.maximum(over.max(axis=reduce, keepdims=False) if values.ndim else over, 1.0).reshape(-1)
    if (widen > 1.0).any():
        scale = (scale * widen).astype(scale.dtype)
        ratio = values.astype(np.float64) / _broadcast(scale, axis, values.ndim)
    integers = np.clip(np.rint(ratio) + zero, info.min, info.max).astype(zero_point.dtype)
    return integers, scale


class _Names:
    """Unique names for restored nodes and initializers, and lookup of the graph's values by name."""

    def __init__(self, graph: ir.Graph) -> None:
        self.graph = graph
        self.values = {v.name: v for v in graph.inputs} | dict(graph.initializers)
        self.values |= {v.name: v for node in graph for v in node.outputs if v is not None}
        self.nodes = {node.name for node in graph}

    def value(self, name: str) -> ir.Value | None:
        return self.values.get(name)

    def node(self, name: str) -> str:
        unique = name
        while unique in self.nodes:
            unique += "_"
        self.nodes.add(unique)
        return unique

    def initializer(self, name: str, tensor: ir.TensorProtocol) -> ir.Value:
        unique = name
        while unique in self.values:
            unique += "_"
        value = ir.Value(name=unique, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
        self.graph.register_initializer(value)
        self.values[unique] = value
        return value
