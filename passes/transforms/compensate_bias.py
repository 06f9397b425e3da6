"""CompensateBias: FLAP's bias compensation, run between the allocation and `PruneChannels`.

A layer y = W x + b that loses input feature j loses W[:, j] x_j. Replacing x_j by its mean over the
calibration tokens instead of by zero keeps the layer's output unbiased: b' = b + Σ_removed W[:, j] E[x_j]
(An et al., 2024, eq. 7). The means are the dense model's, streamed over the calibration batches
(`flap.feature_statistics`), and the compensation is added where the layer's bias is: Gemm's C input,
the constant of an Add right after a MatMul, or a new Add (Llama's projections have no bias).

`Reconstruct(mode="bias")` reaches the same mean shift from the other side, after pruning, by walking
the whole model in torch on every calibration batch at once; that needs every op in the torch
interpreter and, for a language model, all the logits of every window in memory. This pass needs one
onnxruntime pass over the data and the means of the removed features only. Convolutions are left out:
their removed inputs' means are not constant at padded borders.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from pcc.compiler.calibration import CalibrationData
from pcc.passes.allocation.allocation import Allocation
from pcc.passes.analysis.dependency_groups import DependencyGroups
from pcc.passes.analysis.flap import ConsumerInput, consumer_inputs, feature_statistics
from pcc.passes.results import fetch, store

__all__ = ["BiasCompensation", "CompensateBias", "compensation"]


@dataclass
class BiasCompensation:
    """What `CompensateBias` did: per layer, the removed inputs and the size of the bias shift."""

    META_KEY = "pcc.bias_compensation"
    PRODUCED_BY = "CompensateBias"

    layers: dict[str, tuple[int, float]] = field(default_factory=dict)  # node -> (inputs removed, ||Δb||)
    tokens: int = 0

    def summary(self) -> str:
        removed = sum(n for n, _ in self.layers.values())
        return f"bias compensation: {len(self.layers)} layers, {removed} removed inputs, means over {self.tokens} tokens"


def compensation(weight: np.ndarray, weight_axis: int, removed: np.ndarray, means: np.ndarray) -> np.ndarray:
    """Σ_j∈removed W[j-th input] · E[x_j]: the bias shift of a linear layer losing inputs `removed`."""
    columns = np.moveaxis(weight.astype(np.float64), weight_axis, 0)[removed]
    return np.tensordot(means[removed], columns, axes=1)


def _layers(model: ir.Model) -> dict[str, ir.Node]:
    return {node.inputs[1].name: node for node in model.graph
            if node.op_type in ("MatMul", "Gemm") and len(node.inputs) > 1 and node.inputs[1] is not None}


def _constant(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    value = ir.Value(name=name, const_value=ir.tensor(np.ascontiguousarray(array), name=name))
    value.shape, value.dtype = ir.Shape(array.shape), value.const_value.dtype
    graph.register_initializer(value)
    return value


def _constant_bias(node: ir.Node, size: int) -> tuple[ir.Node, int, float] | None:
    """(node, input index, scale) of the layer's constant bias: Gemm's C (times beta) or an Add after a MatMul."""
    if node.op_type == "Gemm":
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        beta = node.attributes.get_float("beta", 1.0)
        if bias is not None and bias.const_value is not None and bias.const_value.size == size and beta != 0:
            return node, 2, beta
        return None
    users = [use.node for use in node.outputs[0].uses()]
    if len(users) == 1 and users[0].op_type == "Add":
        for index, operand in enumerate(users[0].inputs):
            if operand is not None and operand.const_value is not None and operand.const_value.size == size:
                return users[0], index, 1.0
    return None


def _add_bias(graph: ir.Graph, node: ir.Node, shift: np.ndarray) -> None:
    """Add `shift` to the layer's bias, or give the layer one (an Add after it)."""
    dtype = node.inputs[1].const_value.numpy().dtype
    found = _constant_bias(node, shift.size)
    if found is not None:
        holder, index, scale = found
        bias = holder.inputs[index]
        total = bias.const_value.numpy() + (shift / scale).reshape(bias.const_value.shape)
        holder.replace_input_with(index, _constant(graph, f"{bias.name}_compensated", total.astype(dtype)))
        return
    output = node.outputs[0]
    add = ir.node("Add", [output, _constant(graph, f"{node.name}_compensation", shift.astype(dtype))],
                  name=f"{node.name}_compensation")
    shifted = add.outputs[0]
    shifted.shape, shifted.type = output.shape, output.type
    for use in list(output.uses()):
        if use.node is not add:
            use.node.replace_input_with(use.idx, shifted)
    if output in graph.outputs:  # the model's output keeps its name
        shifted.name, output.name = output.name, f"{output.name}_uncompensated"
        graph.outputs[graph.outputs.index(output)] = shifted
    else:
        shifted.name = f"{output.name}_compensated"
    graph.insert_after(node, add)


@dataclass
class CompensateBias(ir.passes.InPlacePass):
    """Transform: fold the mean contribution of every input the `Allocation` removes into its layer's bias.

    Run after an allocator and before `PruneChannels` (which then removes the compensated inputs).
    """

    calibration: CalibrationData | None = field(default=None, repr=False)

    def requires(self, model: ir.Model) -> None:
        fetch(model, DependencyGroups)
        fetch(model, Allocation)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        groups, removed = fetch(model, DependencyGroups), fetch(model, Allocation).removed
        layers = _layers(model)
        chosen: list[tuple[ConsumerInput, np.ndarray]] = []
        for consumer in consumer_inputs(model, groups):
            units = groups.space_units[consumer.space_id]
            gone = (units >= 0) & removed[np.maximum(units, 0)]
            if gone.any() and consumer.weight in layers:
                chosen.append((consumer, gone))
        report = BiasCompensation()
        if chosen:
            calibration = self.calibration if self.calibration is not None else CalibrationData.random(model)
            stats = feature_statistics(model, {c.activation: c.activation_axis for c, _ in chosen}, calibration)
            report.tokens = stats.tokens
            for consumer, gone in chosen:
                node = layers[consumer.weight]
                weight = model.graph.initializers[consumer.weight].const_value.numpy()
                shift = compensation(weight, consumer.weight_axis, gone, stats.mean[consumer.activation])
                _add_bias(model.graph, node, shift)
                report.layers[node.name] = (int(gone.sum()), float(np.linalg.norm(shift)))
        store(model, report)
        return ir.passes.PassResult(model, modified=bool(chosen))
