"""Cost of a model: weight parameters and multiply-accumulates (MACs).

MACs count the layers that dominate inference time (Conv, ConvTranspose, Gemm, MatMul) from the
inferred shapes. A model with symbolic input axes is counted on a copy specialised to the sizes its
latency is timed at (batch `batch`, other symbolic axes `length`, or the user's `input_shapes`), with the
shape arithmetic folded: counting a symbolic sequence as 1 made a 128-token MiniLM cost 10.6M MACs next
to a latency measured at 128 tokens, and a token-pruned model's run-time top-k counts become sizes only
once the length is known. A fixed-length export whose sequence axis was made symbolic for token pruning
(`RelaxedSequence`) is counted at its own length. Axes that stay unknown even then count as 1. Fused
attention ops (com.microsoft Attention, MultiHeadAttention, GroupQueryAttention, opset-23 Attention) count
what their unfused export's MatMuls would. `MeasureCost` records the cost at
a named point of a pipeline, so "before" and "after" pruning come from the same code.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from pcc.compiler.errors import InvalidRequestError
from pcc.passes.analysis.dependency_groups import is_parameter
from pcc.passes.analysis.fused_attention import InferContribShapes
from pcc.passes.results import lookup, store
from pcc.passes.analysis.shapes import RelaxedSequence, needs_specialising, representative_shapes, specialise_shapes
from pcc.passes.analysis.transposed_weights import transposed_copies

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
    """The parameters stored, a tied weight's folded transposed copy counted once (as the model has it)."""
    stored = sum(v.const_value.size for v in model.graph.initializers.values() if is_parameter(v))
    return stored - sum(copy.const_value.size for copy, _ in transposed_copies(model.graph) if is_parameter(copy))


def _numel(shape: ir.Shape | None) -> int | None:
    if shape is None:
        return None
    return int(np.prod([d if isinstance(d, int) else 1 for d in shape], dtype=np.int64))


def _dims(value: ir.Value | None) -> list[int] | None:
    if value is None or value.shape is None:
        return None
    return [d if isinstance(d, int) else 1 for d in value.shape]


def _node_macs(node: ir.Node) -> int:
    if (node.domain, node.op_type) in _FUSED_ATTENTION:
        return _FUSED_ATTENTION[node.domain, node.op_type](node)
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


# Fused attention: Q·Kᵀ and P·V cost batch × queries × keys × (query width + value width summed over the
# query heads), the same products the unfused export's two MatMuls count; com.microsoft Attention also
# projects its input with its packed QKV weight. Sizes come from the inputs (onnx infers no com.microsoft
# outputs); a past key/value cache adds its length to the keys.


def _input(node: ir.Node, index: int) -> list[int] | None:
    return _dims(node.inputs[index]) if len(node.inputs) > index else None


def _attr(node: ir.Node, name: str, default):
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def _core_macs(batch: int, queries: int, keys: int, query_width: int, value_width: int) -> int:
    return batch * queries * keys * (query_width + value_width)


def _contrib_attention(node: ir.Node) -> int:
    """com.microsoft Attention: input [B, S, In], packed weight [In, Q+K+V] (qkv_hidden_sizes, else thirds),
    past [2, B, H, P, d]."""
    x, weight, past = _input(node, 0), _input(node, 1), _input(node, 4)
    if x is None or weight is None or len(x) != 3:
        return 0
    sizes = _attr(node, "qkv_hidden_sizes", None) or [weight[1] // 3] * 3
    keys = x[1] + (past[3] if past is not None and len(past) == 5 else 0)
    return x[0] * x[1] * x[2] * weight[1] + _core_macs(x[0], x[1], keys, sizes[0], sizes[2])


def _heads_layout(value: list[int]) -> tuple[int, int]:
    """(length, width over all heads) of [B, L, H·d] or [B, H, L, d]."""
    return (value[1], value[2]) if len(value) == 3 else (value[2], value[1] * value[3])


def _contrib_multi_head_attention(node: ir.Node) -> int:
    """com.microsoft MultiHeadAttention: query [B, S, D]; key/value [B, L, D] or [B, H, L, d]; past_key
    [B, H, P, d]."""
    query, key, value, past = _input(node, 0), _input(node, 1), _input(node, 2), _input(node, 6)
    if query is None or key is None or value is None or len(query) != 3 or len(key) not in (3, 4):
        return 0
    keys, _ = _heads_layout(key)
    _, value_width = _heads_layout(value)
    if past is not None and len(key) == 3:
        keys += past[2]
    return _core_macs(query[0], query[1], keys, query[2], value_width)


def _group_query_attention(node: ir.Node) -> int:
    """com.microsoft GroupQueryAttention: query [B, S, H·d] (or packed with K and V, [B, S, (H + 2·Hkv)·d]),
    past_key [B, Hkv, P, d]."""
    query, key, past = _input(node, 0), _input(node, 1), _input(node, 3)
    if query is None or len(query) != 3:
        return 0
    heads, kv_heads = _attr(node, "num_heads", 1), _attr(node, "kv_num_heads", 1)
    head_dim = query[2] // (heads if key is not None else heads + 2 * kv_heads)
    keys = query[1] + (past[2] if past is not None and len(past) == 4 else 0)
    return _core_macs(query[0], query[1], keys, heads * head_dim, heads * head_dim)


def _onnx_attention(node: ir.Node) -> int:
    """opset-23 Attention: Q/K/V [B, H, L, d] or [B, L, H·d] (q_num_heads, kv_num_heads); past_key [B, Hkv, P, d]."""
    query, key, value, past = _input(node, 0), _input(node, 1), _input(node, 2), _input(node, 4)
    if query is None or key is None or value is None or len(query) not in (3, 4):
        return 0
    q_heads = query[1] if len(query) == 4 else _attr(node, "q_num_heads", 1)
    kv_heads = key[1] if len(key) == 4 else _attr(node, "kv_num_heads", 1)
    queries, query_width = _heads_layout(query)
    keys, _ = _heads_layout(key)
    _, value_width = _heads_layout(value)
    if past is not None and len(past) == 4:
        keys += past[2]
    return _core_macs(query[0], queries, keys, query_width, value_width * q_heads // max(kv_heads, 1))


_FUSED_ATTENTION = {
    ("com.microsoft", "Attention"): _contrib_attention,
    ("com.microsoft", "MultiHeadAttention"): _contrib_multi_head_attention,
    ("com.microsoft", "GroupQueryAttention"): _group_query_attention,
    ("", "Attention"): _onnx_attention,
    ("ai.onnx", "Attention"): _onnx_attention,
}


def count_macs(
    model: ir.Model, batch: int = 1, length: int = 128, input_shapes: Mapping[str, tuple[int, ...]] | None = None
) -> int:
    """MACs of one inference (needs inferred shapes), symbolic input axes at batch `batch` and length
    `length` (or `input_shapes`).

    A negative size is what shape inference gives where the model cannot run at those sizes (a 512-sample
    convolution kernel over 128 samples): that is refused rather than counted as negative MACs."""
    sizes = None
    if needs_specialising(model, input_shapes):
        sizes = representative_shapes(model, batch, length, input_shapes)
        model = specialise_shapes(model, sizes)
        if any(node.domain == "com.microsoft" for node in model.graph):
            # the sizes after com.microsoft ops, which onnx cannot infer (onnxruntime's inference reads
            # constants as initializers only)
            common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
            InferContribShapes(refine=True)(model)
    total = 0
    for node in model.graph:
        dims = [d for v in node.outputs if v is not None and v.shape is not None for d in v.shape if isinstance(d, int)]
        macs = _node_macs(node)
        if macs and any(d < 0 for d in dims):
            at = "" if sizes is None else " at " + " ".join(f"{k}={','.join(map(str, v))}" for k, v in sizes.items())
            raise InvalidRequestError(
                f"{node.op_type} node '{node.name}' has an output of negative size{at}: the model does not run at "
                "these sizes; give sizes it runs at with --input-shape NAME=D0,D1,..."
            )
        total += macs
    return total


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
