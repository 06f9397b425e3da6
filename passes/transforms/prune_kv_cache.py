"""PruneKVCache: SpAtten's cascade token pruning for generation, applied to a decoder step's KV cache.

A causal LM generating token by token carries each layer's keys and values of every token seen so far
(the KV cache); its memory and every step's attention work grow with the text. SpAtten prunes tokens
here too: a token's score accumulates the attention it receives (sum over heads and queries of the
probabilities), across generation steps, and the lowest-scoring tokens are dropped from the cache for
every later step. This pass rewrites a *decoder step* graph, one that takes `past` keys/values and
returns `present = Concat(past, new)`, so that each layer's returned cache holds at most `capacity[l]`
tokens: the top-scoring ones, in their original order. Each layer also gets a score state
(`past_scores_<l>` in, `present_scores_<l>` out, [batch, cached]) that the caller feeds back like the
cache itself (zeros-length at the start).

Choices, and why:
- Capacities follow SpAtten's cascade: none pruned in the first 15% of the layers, then a ramp, so
  deeper layers hold fewer tokens (as in the published GPT-2 trace: 0.9, 0.7, 0.2, ..., 0.1 of the keys).
- Scores accumulate per layer across steps (each layer ranks its own cache). SpAtten also sums scores
  across layers, which needs every layer to track the same tokens; per-layer caches of different sizes
  hold different tokens, so here the cascade runs over steps and the schedule over layers.
- The newest `recent` tokens are always kept. A token that just arrived has had one step to gather
  attention while old tokens have had many: without the window every new token would be dropped as soon
  as the cache is full, freezing the cache at the prompt.
- The step itself attends to the whole cache it was given plus the new tokens; pruning only shrinks
  what later steps see. So a capacity at least the generated length reproduces the dense model exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from pcc.compiler.errors import InvalidRequestError
from pcc.passes.analysis.attention import MOVEMENT_OPS
from pcc.passes.results import store
from pcc.passes.transforms.prune_tokens import TOKENS_UNPRUNED, GraphBuilder, cascade_keep_schedule

__all__ = ["KVCacheReport", "PruneKVCache", "find_kv_caches"]

_RECENT_BONUS = 1e9  # above any accumulated score (a sum of probabilities over heads, queries and steps)


@dataclass(frozen=True)
class KVCache:
    """One layer's cache in a decoder step graph: the Concat(past, new) nodes and the layer's softmax."""

    keys: ir.Node
    values: ir.Node
    probabilities: ir.Value  # [batch, heads, queries, cached + new]


@dataclass
class KVCacheReport:
    META_KEY = "pcc.kv_cache_report"
    PRODUCED_BY = "PruneKVCache"

    capacity: list[int]  # per layer, the most tokens its cache holds after a step
    recent: int
    score_inputs: list[str]
    score_outputs: list[str]

    def summary(self) -> str:
        return f"KV cache capacity per layer: {' '.join(map(str, self.capacity))} tokens (newest {self.recent} always kept)"


def _cache_concat(node: ir.Node) -> bool:
    """Concat(past, new) along the token axis of a rank-4 cache, past a graph input, result a graph output."""
    if node.op_type != "Concat" or len(node.inputs) != 2 or not node.outputs[0].is_graph_output():
        return False
    past, result = node.inputs[0], node.outputs[0]
    axis = node.attributes.get_int("axis", 0)
    rank = len(result.shape) if result.shape is not None else None
    return past is not None and past.is_graph_input() and rank == 4 and axis in (2, -2)


def _downstream_softmax(value: ir.Value, depth: int = 8) -> ir.Node | None:
    """The first Softmax a cached key tensor reaches (through the transpose, the scores MatMul, scaling, mask)."""
    frontier = [value]
    for _ in range(depth):
        nodes = [use.node for v in frontier for use in v.uses()]
        for node in nodes:
            if node.op_type == "Softmax":
                return node
        frontier = [out for node in nodes for out in node.outputs]
    return None


def _probabilities_for_values(value: ir.Value) -> ir.Value | None:
    """The probabilities a cached value tensor is weighted by: the other operand of the MatMul it feeds."""
    frontier = [value]
    while frontier:
        current = frontier.pop()
        for use in current.uses():
            node = use.node
            if node.op_type in MOVEMENT_OPS:
                frontier.extend(node.outputs)
            elif node.op_type == "MatMul" and use.idx == 1:
                return node.inputs[0]
    return None


def find_kv_caches(graph: ir.Graph) -> list[KVCache]:
    """The decoder step's caches, one per attention layer in graph order."""
    concats = [node for node in graph if _cache_concat(node)]
    by_softmax: dict[ir.Value, dict[str, ir.Node]] = {}
    for node in concats:
        softmax = _downstream_softmax(node.outputs[0])
        probabilities = _probabilities_for_values(node.outputs[0])
        if probabilities is not None and probabilities.producer() is not None and probabilities.producer().op_type == "Softmax":
            by_softmax.setdefault(probabilities, {})["values"] = node
        elif softmax is not None:
            by_softmax.setdefault(softmax.outputs[0], {})["keys"] = node
    caches = []
    for probabilities, pair in by_softmax.items():
        if set(pair) != {"keys", "values"}:
            raise InvalidRequestError(
                f"KV cache pruning: the attention with softmax {probabilities.name} has a cached "
                f"{next(iter(pair))} tensor but no matching cached {'values' if 'keys' in pair else 'keys'}"
            )
        caches.append(KVCache(pair["keys"], pair["values"], probabilities))
    return caches


def kv_capacity_schedule(layers: int, sparsity: float, context: int, recent: int) -> list[int]:
    """Per-layer cache capacities that remove `sparsity` of the cached tokens on average once `context`
    tokens have been seen (SpAtten's cascade schedule over layers), never below `recent` + 1."""
    return [max(recent + 1, math.floor(context * keep)) for keep in cascade_keep_schedule(layers, sparsity, TOKENS_UNPRUNED)]


@dataclass
class PruneKVCache(ir.passes.InPlacePass):
    """Transform: bound each layer's KV cache of a decoder step graph by `capacity` (one int per layer), or
    by the cascade schedule for `sparsity` at a `context` length."""

    capacity: tuple[int, ...] | None = None
    sparsity: float | None = None
    context: int | None = None
    recent: int = 8
    report: KVCacheReport | None = field(default=None, init=False)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if (self.capacity is None) == (self.sparsity is None) or (self.sparsity is not None and self.context is None):
            raise InvalidRequestError("PruneKVCache takes either capacity, or sparsity with context")
        if self.recent < 1:
            raise InvalidRequestError(f"PruneKVCache keeps at least the newest token (recent >= 1), got {self.recent}")
        caches = find_kv_caches(model.graph)
        if not caches:
            raise InvalidRequestError(
                "KV cache pruning needs a decoder step graph: Concat(past, new) of rank-4 keys and values "
                "(past a graph input, the result a graph output) feeding an attention softmax; found none"
            )
        capacity = list(self.capacity) if self.capacity is not None else kv_capacity_schedule(
            len(caches), self.sparsity, self.context, self.recent
        )
        if len(capacity) != len(caches) or any(c <= self.recent for c in capacity):
            raise InvalidRequestError(
                f"KV cache capacities are one int above recent={self.recent} per attention layer ({len(caches)}), got {capacity}"
            )
        build = GraphBuilder(model.graph, "pcc_kv")
        score_inputs, score_outputs = [], []
        for index, (cache, limit) in enumerate(zip(caches, capacity)):
            past, present = self._bound(build, cache, limit, index)
            score_inputs.append(past)
            score_outputs.append(present)
        common_passes.RemoveUnusedNodesPass()(model)
        common_passes.TopologicalSortPass()(model)
        self.report = KVCacheReport(capacity, self.recent, score_inputs, score_outputs)
        store(model, self.report)
        return ir.passes.PassResult(model, True)

    def _bound(self, build: GraphBuilder, cache: KVCache, limit: int, index: int) -> tuple[str, str]:
        graph = build.graph
        past_keys = cache.keys.inputs[0]
        cached_dim = past_keys.shape[2]
        batch_dim = past_keys.shape[0]
        past_scores = ir.Value(name=f"past_scores_{index}", shape=ir.Shape([batch_dim, cached_dim]),
                               type=ir.TensorType(ir.DataType.FLOAT))
        graph.inputs.append(past_scores)
        received = build.op("ReduceSum", [cache.probabilities, build.const([1, 2])], keepdims=0)  # [batch, cached + new]
        total = build.dims(received, 1, 2)
        new = build.op("Sub", [total, build.dims(past_scores, 1, 2)])
        padded = build.op("Pad", [past_scores, build.op("Concat", [build.const([0, 0, 0]), new], axis=0)])
        scores = build.op("Add", [padded, received])
        count = build.op("Min", [total, build.const([limit])])
        survivors = build.top_in_order(build.op("Add", [scores, self._recent_bonus(build, total)]), count)
        for concat in (cache.keys, cache.values):
            grown = concat.outputs[0]
            output_name, output_index = grown.name, graph.outputs.index(grown)
            grown.name = f"{output_name}_unpruned"
            kept = build.gather_tokens(grown, survivors, 4, 2, 0)
            kept.name, kept.shape, kept.type = output_name, ir.Shape([*grown.shape[:2], f"kept_{index}", grown.shape[3]]), grown.type
            graph.outputs[output_index] = kept
        present_scores = build.gather_tokens(scores, survivors, 2, 1, 0)
        present_scores.name, present_scores.type = f"present_scores_{index}", past_scores.type
        present_scores.shape = ir.Shape([batch_dim, f"kept_{index}"])
        graph.outputs.append(present_scores)
        return past_scores.name, present_scores.name

    def _recent_bonus(self, build: GraphBuilder, total: ir.Value) -> ir.Value:
        """A [cached + new] row: a large bonus on the newest `recent` positions, zero elsewhere."""
        positions = build.op("Range", [build.const(0), build.op("Squeeze", [total]), build.const(1)])
        recent = build.op("GreaterOrEqual", [positions, build.op("Sub", [build.op("Squeeze", [total]), build.const(self.recent)])])
        return build.op("Mul", [build.op("Cast", [recent], to=ir.DataType.FLOAT), build.const(_RECENT_BONUS, np.float32)])
