"""Cost of a model: weight parameters and multiply-accumulates (MACs).

MACs count the layers that dominate inference time (Conv, ConvTranspose, Gemm, MatMul) from the
inferred shapes. A model with symbolic input axes is counted on a copy specialised to the sizes its
latency is timed at (batch `batch`, other symbolic axes `length`, or the user's `input_shapes`), with the
shape arithmetic folded: counting a symbolic sequence as 1 made a 128-token MiniLM cost 10.6M MACs next
to a latency measured at 128 tokens, and a token-pruned model's run-time top-k counts become sizes only
once the length is known. A fixed-length export whose sequence axis was made symbolic for token pruning
(`RelaxedSequence`) is counted at its own length. Axes that stay unknown even then count as 1. `MeasureCost` records the cost at
a named point of a pipeline, so "before" and "after" pruning come from the same code.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from pcc.passes.analysis.dependency_groups import is_parameter
from pcc.passes.results import lookup, store
from pcc.passes.analysis.shapes import RelaxedSequence, needs_specialising, representative_shapes, specialise_shapes

__all__ = ["Cost", "CostReport", "MeasureCost", "count_params", "count_macs", "measure_cost"]


@dataclass(frozen=True)
class Cost:
    params: int
    macs: int


@dataclass
class CostReport:
    """Costs recorded by `MeasureCost` passes, by label ("before", "after", ...)."""

    META_KEY = "pcc.cost"
    PRODUCED_BY = "MeasureCost"

    costs: dict[str, Cost] = field(default_factory=dict)


def count_params(model: ir.Model) -> int:
    return sum(v.const_value.size for v in model.graph.initializers.values() if is_parameter(v))


def _numel(shape: ir.Shape | None) -> int | None:
    if shape is None:
        return None
    return int(np.prod([d if isinstance(d, int) else 1 for d in shape], dtype=np.int64))


def _dims(value: ir.Value | None) -> list[int] | None:
    if value is None or value.shape is None:
        return None
    return [d if isinstance(d, int) else 1 for d in value.shape]


def _node_macs(node: ir.Node) -> int:
    if node.domain not in ("", "ai.onnx"):
        return 0
    op = node.op_type
    if op in ("Conv", "ConvTranspose"):
        # weight[1] is already per group (Conv: in/group; ConvTranspose: out/group); each output
        # element of a Conv (each input element of a ConvTranspose) costs weight[1] x kernel MACs.
        weight = _dims(node.inputs[1])
        driver = _numel((node.outputs[0] if op == "Conv" else node.inputs[0]).shape)
        if weight is None or driver is None:
            return 0
        return driver * weight[1] * int(np.prod(weight[2:], dtype=np.int64))
    if op in ("Gemm", "MatMul"):
        a, y = _dims(node.inputs[0]), node.outputs[0].shape
        if a is None or y is None or not a:
            return 0
        trans_a = op == "Gemm" and "transA" in node.attributes and node.attributes["transA"].value
        reduction = a[-2] if trans_a else a[-1]
        return _numel(y) * reduction
    return 0


def count_macs(
    model: ir.Model, batch: int = 1, length: int = 128, input_shapes: Mapping[str, tuple[int, ...]] | None = None
) -> int:
    """MACs of one inference (needs inferred shapes), symbolic input axes at batch `batch` and length
    `length` (or `input_shapes`)."""
    if needs_specialising(model, input_shapes):
        model = specialise_shapes(model, representative_shapes(model, batch, length, input_shapes))
    return sum(_node_macs(node) for node in model.graph)


def measure_cost(
    model: ir.Model, batch: int = 1, length: int = 128, input_shapes: Mapping[str, tuple[int, ...]] | None = None
) -> Cost:
    return Cost(params=count_params(model), macs=count_macs(model, batch, length, input_shapes))


@dataclass
class MeasureCost(ir.passes.InPlacePass):
    """Analysis: record params and MACs under `label` in the model's `CostReport`, MACs at batch `batch` and
    length `length` (or `input_shapes`) where the inputs have symbolic axes: the sizes latency is timed at."""

    label: str = "before"
    batch: int = 1
    length: int = 128
    input_shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        report = model.meta.get(CostReport.META_KEY) or CostReport()
        relaxed = lookup(model, RelaxedSequence)  # a fixed-length export runs (and is timed) at its own length
        length = relaxed.length if relaxed is not None else self.length
        report.costs[self.label] = measure_cost(model, self.batch, length, self.input_shapes)
        store(model, report)
        return ir.passes.PassResult(model, modified=False)
