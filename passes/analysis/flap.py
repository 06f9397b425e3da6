"""FLAP's fluctuation metric (An et al., AAAI 2024): how much removing an input feature of a layer changes its output.

A unit (an FFN channel, an attention head) reaches the rest of the network only through the layers that
read it: the output projection (o_proj) for a head, the down projection for a SwiGLU channel, in general
every Conv/Gemm/MatMul consuming the group. If input feature j of such a layer W is removed and replaced by
its mean (which the bias compensation folds into the layer's bias, `Reconstruct(mode="bias")`), the output
changes by W[:, j] (x_j − E[x_j]), whose expected squared norm is

    s_j = Var(x_j) · ||W[:, j]||²                  (FLAP's "WIFV", the weighted input-feature variance)

over the calibration tokens. A unit's score sums this over its features (a head's head_dim features, or
a grouped-query unit's key/value head with its query heads) in every layer that reads it.

FLAP's adaptive structure ("AL-AM") compares those scores across layers and kinds after standardising
them per layer: each group's feature scores are centred on their mean and divided by their standard
deviation, a unit scoring the mean z-score of its features. One global ranking of the standardised
scores (`AllocateStandardised`, weighted by each unit's cost as the budget counts it) then sets every
layer's width, so layers whose features fluctuate evenly lose more.

Statistics are accumulated per batch (sums of x and x² per feature, in float64), so memory stays at one
batch of activations whatever the number of calibration windows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir

from pcc.compiler.calibration import CalibrationData
from pcc.passes.analysis.channel_rules import Role
from pcc.passes.analysis.dependency_groups import DependencyGroups

__all__ = ["ConsumerInput", "FeatureStatistics", "consumer_inputs", "feature_statistics", "fluctuation_scores"]


@dataclass(frozen=True)
class ConsumerInput:
    """A layer reading a group's units: its weight's input axis and the activation feeding it."""

    space_id: int  # the weight's input-feature space in `DependencyGroups`
    weight: str
    weight_axis: int
    activation: str
    activation_axis: int  # the feature axis of the activation


def _activation_axis(node: ir.Node, weight: ir.Value) -> int | None:
    """The feature axis of the data input of a linear layer whose `weight` input reads it."""
    if node.op_type == "MatMul" and node.inputs[1] is weight:
        return -1
    if node.op_type == "Gemm" and node.inputs[1] is weight and not node.attributes.get_int("transA", 0):
        return 1
    if node.op_type == "Conv" and node.inputs[1] is weight and node.attributes.get_int("group", 1) == 1:
        return 1
    return None


def consumer_inputs(model: ir.Model, groups: DependencyGroups) -> list[ConsumerInput]:
    """Every Conv/Gemm/MatMul input-feature space that belongs to some unit, with the activation it reads."""
    readers = {}
    for node in model.graph:
        if node.op_type in ("MatMul", "Gemm", "Conv") and len(node.inputs) > 1 and node.inputs[1] is not None:
            axis = _activation_axis(node, node.inputs[1])
            if axis is not None:
                readers[node.inputs[1].name] = (node.inputs[0].name, axis)
    found = []
    for space_id, units in groups.space_units.items():
        space = groups.spaces[space_id]
        if space.is_param and space.role is Role.IN and space.value in readers and (units >= 0).any():
            activation, axis = readers[space.value]
            found.append(ConsumerInput(space_id, space.value, space.axis, activation, axis))
    return found


@dataclass
class FeatureStatistics:
    """Mean and variance of every input feature of the consumer layers, over the calibration tokens."""

    mean: dict[str, np.ndarray]  # by activation name
    variance: dict[str, np.ndarray]
    tokens: int  # rows each statistic was taken over (the first activation's)


def feature_statistics(model: ir.Model, activations: dict[str, int], calibration: CalibrationData) -> FeatureStatistics:
    """Per-feature mean and variance of each named activation (`{name: feature axis}`), streamed over batches."""
    from pcc.backends.onnx.runtime import session

    proto = ir.serde.serialize_model(model)
    graph_outputs = {o.name for o in proto.graph.output}
    names = list(activations)
    proto.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names if n not in graph_outputs)
    sess = session(proto.SerializeToString())
    sums: dict[str, np.ndarray] = {}
    squares: dict[str, np.ndarray] = {}
    counts: dict[str, int] = dict.fromkeys(names, 0)
    for batch in calibration:
        for name, value in zip(names, sess.run(names, batch)):
            rows = np.moveaxis(value, activations[name], -1).reshape(-1, value.shape[activations[name]]).astype(np.float64)
            sums[name] = sums.get(name, 0.0) + rows.sum(axis=0)
            squares[name] = squares.get(name, 0.0) + (rows**2).sum(axis=0)
            counts[name] += len(rows)
    mean = {n: sums[n] / counts[n] for n in names}
    variance = {n: np.maximum(squares[n] / counts[n] - mean[n] ** 2, 0.0) for n in names}
    return FeatureStatistics(mean, variance, counts[names[0]] if names else 0)


def fluctuation_scores(model: ir.Model, groups: DependencyGroups, calibration: CalibrationData) -> tuple[np.ndarray, list[int]]:
    """Standardised FLAP scores of every unit, and the groups no linear layer reads (scored 0: the mean)."""
    consumers = consumer_inputs(model, groups)
    stats = feature_statistics(model, {c.activation: c.activation_axis for c in consumers}, calibration)
    owner = groups.unit_group()
    per_group: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}  # group -> [(units, feature scores)]
    for consumer in consumers:
        weight = model.graph.initializers[consumer.weight].const_value.numpy().astype(np.float64)
        column_norms = np.moveaxis(weight**2, consumer.weight_axis, 0).reshape(weight.shape[consumer.weight_axis], -1).sum(1)
        scores = stats.variance[consumer.activation] * column_norms
        units = groups.space_units[consumer.space_id]
        valid = units >= 0
        for group in np.unique(owner[units[valid]]):
            mine = valid.copy()
            mine[valid] = owner[units[valid]] == group
            per_group.setdefault(int(group), []).append((units[mine], scores[mine]))
    result = np.zeros(groups.num_units)
    for group, parts in per_group.items():
        units = np.concatenate([u for u, _ in parts])
        features = np.concatenate([s for _, s in parts])
        spread = features.std()
        z = (features - features.mean()) / spread if spread > 0 else np.zeros_like(features)
        totals = np.bincount(units, weights=z, minlength=groups.num_units)
        counts = np.bincount(units, minlength=groups.num_units)
        present = counts > 0
        result[present] = totals[present] / counts[present]
    unscored = [g.index for g in groups.groups if g.index not in per_group]
    return result, unscored
