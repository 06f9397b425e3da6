"""EmulateProgressiveQuantization: SpAtten's attention arithmetic written into the graph, so that the
functional model runs in onnxruntime and *measures* how often progressive quantization refetches.

SpAtten keeps K and V in DRAM as fixed-point words. For each head it first fetches only the `msb_bits`
most significant bits of every key, computes Q·Kᵀ and the softmax from them, and where a query row's
largest probability is below `tau` (a flat distribution, sensitive to rounding) it fetches the remaining
`lsb_bits` and recomputes that row from the full words. The simulator charges those LSB fetches and the
recomputed rows from the *fraction* of rows that needed them; this pass makes that fraction an output of
the model, counted on whatever inputs it runs on, instead of an assumption.

Per attention core (MatMul(Q, Kᵀ) → [scale] → [mask] → Softmax → MatMul(·, V)), as run-time ops:
- Scales are symmetric and dynamic, one per (batch, head) matrix: max|x| over its last two axes, computed
  at run time (ReduceMax of Abs), as a quantizer in front of SpAtten's DRAM would see each head's K, Q or V.
  Per-head rather than per-tensor, so that one sentence's result does not depend on the rest of its batch.
- K becomes `msb_bits + lsb_bits`-bit integers (round to nearest): the full word. Its MSB-only version
  drops the `lsb_bits` low bits by truncation (floor(k / 2^lsb) x 2^lsb), which is what fetching the top
  bits of a two's-complement word gives; the truncation bias is the same for every key of a dimension, so
  it shifts a row's scores by a constant that the softmax ignores.
- Q is quantized once to `query_bits` (16: the RTL's queries are not progressive; its GPT-2 trace fetches
  `quant_query_bit` 16 next to 6-bit keys), V to `value_bits` (default `msb_bits`, the trace's
  `quant_value_bit`).
- The scores chain (scale, mask, softmax) is duplicated: one copy reads the MSB-only keys, one the full
  words. Every row whose MSB-only maximum probability is below `tau` takes the full-precision row (Where).
  Everything that read the probabilities (the context MatMul, cascade token scores) reads the result.

One extra graph output, `spatten_requant` (int64, [attention layers, 3]), holds per layer, in graph
order: rows that needed the LSBs, rows in total (batch x heads x queries, after token and head pruning)
and keys per row. Summed over batches, column 0 / column 1 is the measured re-quantization fraction.
tau <= 0 never refetches (fraction 0); tau > 1 always does (every probability is at most 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from pcc.compiler.errors import InvalidRequestError
from pcc.passes.analysis.attention import AttentionCore, find_attention_cores
from pcc.passes.transforms.prune_tokens import GraphBuilder

__all__ = ["REQUANT_COLUMNS", "REQUANT_OUTPUT", "EmulateProgressiveQuantization"]

REQUANT_OUTPUT = "spatten_requant"
REQUANT_COLUMNS = ("requantized_rows", "rows", "keys")
_MAX_BITS = 24  # float32 holds every integer of a 24-bit word exactly
_TINY = 1e-30  # an all-zero matrix gets a positive scale (its integers stay 0)


def _reduce_max(build: GraphBuilder, x: ir.Value, axes: list[int], opset: int) -> ir.Value:
    if opset >= 18:  # axes became an input in opset 18
        return build.op("ReduceMax", [x, build.const(axes)], keepdims=1)
    return build.op("ReduceMax", [x], axes=axes, keepdims=1)


def _integers(build: GraphBuilder, x: ir.Value, bits: int, dtype: np.dtype, opset: int) -> tuple[ir.Value, ir.Value]:
    """x as signed `bits`-bit integers (held in floats) and the scale that turns them back into x:
    symmetric, one scale per matrix (the last two axes), round to nearest."""
    levels = build.const(2.0 ** (bits - 1) - 1, dtype)
    peak = build.op("Max", [_reduce_max(build, build.op("Abs", [x]), [-2, -1], opset), build.const(_TINY, dtype)])
    scale = build.op("Div", [peak, levels])
    return build.op("Round", [build.op("Div", [x, scale])]), scale


def _scores_path(core: AttentionCore) -> list[tuple[ir.Node, int]]:
    """The nodes from the scores MatMul's output to the softmax (inclusive), each with the input index that
    carries the scores: at most a scaling and a mask node sit between them (the core's pattern)."""

    def reaches(value: ir.Value | None, depth: int) -> bool:
        node = value.producer() if value is not None else None
        if node is None or depth == 0:
            return False
        return node is core.scores or any(reaches(v, depth - 1) for v in node.inputs)

    path, node = [], core.softmax
    while node is not core.scores:
        index = next(i for i, value in enumerate(node.inputs) if reaches(value, 3))
        path.append((node, index))
        node = node.inputs[index].producer()
    return path[::-1]


@dataclass
class EmulateProgressiveQuantization(ir.passes.InPlacePass):
    """Transform: every attention core computes with SpAtten's quantized K/Q/V and progressive
    quantization (MSB-only keys, full words for rows whose largest probability is below `tau`), and the
    model gains the output `spatten_requant` counting the rows that needed the LSBs."""

    msb_bits: int = 8
    lsb_bits: int = 4
    tau: float = 0.1
    query_bits: int = 16
    value_bits: int | None = None  # None: msb_bits

    def __post_init__(self) -> None:
        widths = {"msb_bits": self.msb_bits, "msb_bits + lsb_bits": self.msb_bits + self.lsb_bits,
                  "query_bits": self.query_bits, "value_bits": self.value_bits or self.msb_bits}
        bad = [f"{name} = {bits}" for name, bits in widths.items() if not 2 <= bits <= _MAX_BITS]
        if self.lsb_bits < 0:
            bad.append(f"lsb_bits = {self.lsb_bits}")
        if bad:
            raise InvalidRequestError(f"progressive quantization needs widths of 2 to {_MAX_BITS} bits and lsb_bits >= 0; "
                                      f"got {', '.join(bad)}")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if any(output.name == REQUANT_OUTPUT for output in model.graph.outputs):
            raise InvalidRequestError(f"the model already has an output {REQUANT_OUTPUT}: it is emulated already")
        cores = find_attention_cores(model)
        if not cores:
            raise InvalidRequestError("SpAtten emulation needs multi-head attention, but the model has no attention core")
        build = GraphBuilder(model.graph, "pcc_spatten")
        opset = model.opset_imports.get("", 1)
        stats = [self._rewrite(build, core, opset) for core in cores]
        counts = build.op("Concat", stats, axis=0)
        counts.name = REQUANT_OUTPUT
        counts.shape, counts.dtype = ir.Shape([len(cores), len(REQUANT_COLUMNS)]), ir.DataType.INT64
        model.graph.outputs.append(counts)
        common_passes.TopologicalSortPass()(model)
        return ir.passes.PassResult(model, True)

    def _rewrite(self, build: GraphBuilder, core: AttentionCore, opset: int) -> ir.Value:
        """Quantize one core's operands, split its softmax into MSB-only and full rows; returns its
        [1, 3] row counts."""
        probabilities = core.softmax.outputs[0]
        readers = [(use.node, use.idx) for use in probabilities.uses()]
        dtype = np.dtype(probabilities.dtype.numpy()) if probabilities.dtype is not None else np.dtype(np.float32)

        query, query_scale = _integers(build, core.scores.inputs[0], self.query_bits, dtype, opset)
        core.scores.replace_input_with(0, build.op("Mul", [query, query_scale]))
        values, value_scale = _integers(build, core.context.inputs[1], self.value_bits or self.msb_bits, dtype, opset)
        core.context.replace_input_with(1, build.op("Mul", [values, value_scale]))
        keys, key_scale = _integers(build, core.scores.inputs[1], self.msb_bits + self.lsb_bits, dtype, opset)
        step = build.const(2.0**self.lsb_bits, dtype)
        msb_keys = build.op("Mul", [build.op("Floor", [build.op("Div", [keys, step])]), step])
        core.scores.replace_input_with(1, build.op("Mul", [msb_keys, key_scale]))

        # the full-word copy of the scores chain (scale, mask, softmax), reading the same operands
        full = build.op("MatMul", [core.scores.inputs[0], build.op("Mul", [keys, key_scale])])
        for node, index in _scores_path(core):
            inputs = [full if i == index else value for i, value in enumerate(node.inputs)]
            full = build.op(node.op_type, inputs, **dict(node.attributes))

        peak = _reduce_max(build, probabilities, [-1], opset)
        refetch = build.op("Less", [peak, build.const(self.tau, dtype)])
        chosen = build.op("Where", [refetch, full, probabilities])
        for node, index in readers:
            node.replace_input_with(index, chosen)

        requantized = build.op("ReduceSum", [build.op("Cast", [refetch], to=ir.DataType.INT64)], keepdims=1)
        rows = build.op("Size", [refetch])
        keys_per_row = build.dims(probabilities, -1)
        counts = build.op("Concat", [build.op("Reshape", [requantized, build.const([1])]),
                                     build.op("Reshape", [rows, build.const([1])]), keys_per_row], axis=0)
        return build.op("Unsqueeze", [counts, build.const([0])])
