"""FindAttentionBlocks: the multi-head attention blocks of a graph, recognised on the attention core.

Exporters write attention in many layouts (fused or separate Q/K/V projections, heads merged with the
batch axis, keys transposed before or after the head split), but every unfused export computes the same
core: MatMul(Q, Kᵀ) → [scale] → [mask] → Softmax → [NaN guard] → MatMul(·, V). onnxscript patterns find
that core (torch's SDPA decomposition wraps the softmax in Where(IsNaN(p), 0, p) for boolean masks and
scales Q and K by sqrt(scale) each, possibly by a factor computed from the input's shape); from its
operands pcc walks back through pure data movement (grouped-query K/V repeats included) and rotary
embeddings (RoPE turns channel pairs within a head) to the Q/K/V projections, and forward from the
context to the output projection, the residual Add and the norm.

Fused attention ops are blocks too: `com.microsoft` `Attention` (one packed [E, 3·E] QKV weight, what
onnxruntime's transformer optimizer emits for BERT), `com.microsoft` `MultiHeadAttention` and opset-23
`Attention` (separate Q/K/V projections feeding them). Their heads are pruned by the channel rules of
`fused_attention` (slicing the packed weight or the projections, rewriting `num_heads`). They have no
probabilities tensor, so token pruning and SpAtten cannot rewrite them. `GroupQueryAttention` is listed.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass

import onnx_ir as ir
from onnxscript.rewriter import pattern

from pcc.compiler.errors import InvalidRequestError
from pcc.passes.analysis.quantization import quantized_model_hint
from pcc.passes.results import store

__all__ = [
    "AttentionBlock",
    "AttentionBlocks",
    "AttentionCore",
    "FindAttentionBlocks",
    "MOVEMENT_OPS",
    "find_attention_cores",
    "find_attention_blocks",
    "movement_source",
]

# ops that only move elements: a chain of them between a projection and the core keeps every value
# (Expand repeats grouped-query key/value heads to the query heads: every value is still one of its input's)
MOVEMENT_OPS = frozenset("Reshape Transpose Squeeze Unsqueeze Gather Slice Split Identity Flatten Expand".split())
_FUSED_OPS = {
    ("", "Attention"): "q_num_heads",
    ("com.microsoft", "Attention"): "num_heads",
    ("com.microsoft", "MultiHeadAttention"): "num_heads",
    ("com.microsoft", "GroupQueryAttention"): "num_heads",
}


def _core_pattern(scale_op: str | None, mask_op: str | None, nan_guard: bool) -> pattern.Pattern:
    def core(op, q, kt, v, scale, mask, fill, zero):
        scores = op.MatMul(q, kt)
        if scale_op is not None:
            scores = getattr(op, scale_op)(scores, scale)
        if mask_op == "Add":
            scores = op.Add(scores, mask)
        elif mask_op == "Where":  # keep where the mask holds
            scores = op.Where(mask, scores, fill)
        elif mask_op == "WhereNot":  # masked_fill: fill where the mask holds
            scores = op.Where(mask, fill, scores)
        probabilities = op.Softmax(scores)
        if nan_guard:  # torch's SDPA: rows whose keys are all masked give NaN, replaced by 0
            probabilities = op.Where(op.IsNaN(probabilities), zero, probabilities)
        return op.MatMul(probabilities, v)

    return pattern.Pattern(core, name=f"attention_core(scale={scale_op}, mask={mask_op}, nan_guard={nan_guard})")


_CORE_PATTERNS = [
    _core_pattern(s, m, g)
    for g, s, m in itertools.product((False, True), (None, "Mul", "Div"), (None, "Add", "Where", "WhereNot"))
]


@dataclass(frozen=True)
class AttentionCore:
    """One matched core: its operands (after any scalar scaling), softmax and context."""

    query: ir.Value  # Q as the scores MatMul reads it, [..., S, d]
    key: ir.Value  # Kᵀ as the scores MatMul reads it, [..., d, S]
    value: ir.Value  # V, [..., S, d]
    scores: ir.Node  # MatMul(Q, Kᵀ)
    softmax: ir.Node
    context: ir.Node  # MatMul(probabilities, V)
    mask: ir.Value | None  # the additive mask or Where condition
    guard: tuple[ir.Node, ...] = ()  # between softmax and context: SDPA's Where(IsNaN(p), 0, p)


def _is_scalar(value: ir.Value) -> bool:
    """One element: a constant, or a factor computed at run time whose shape is all ones (the legacy
    exporter's sqrt(1/sqrt(d)) from the query's Shape)."""
    if value.const_value is not None:
        return value.const_value.size == 1
    return value.shape is not None and all(d == 1 for d in value.shape)


def _strip_scaling(value: ir.Value) -> ir.Value:
    """The operand before any Mul/Div by a scalar (exporters scale Q and K by d**-0.25 each)."""
    while (node := value.producer()) is not None and node.op_type in ("Mul", "Div") and _is_scalar(node.inputs[1]):
        value = node.inputs[0]
    return value


def _guard(context: ir.Node) -> tuple[ir.Node, ...]:
    """The IsNaN and Where of a NaN-guarded softmax feeding `context`, or () if the softmax feeds it directly."""
    where = context.inputs[0].producer()
    return () if where.op_type == "Softmax" else (where.inputs[0].producer(), where)


def find_attention_cores(model: ir.Model) -> list[AttentionCore]:
    """Every unfused attention core of the main graph, in graph order."""
    cores = []
    for node in model.graph:
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
            continue
        for core_pattern in _CORE_PATTERNS:
            match = core_pattern.match(model, model.graph, node, check_nodes_are_removable=False)
            if match:
                softmax = next(n for n in match.nodes if n.op_type == "Softmax")
                scores = next(n for n in match.nodes if n.op_type == "MatMul" and n is not node)
                cores.append(
                    AttentionCore(
                        query=_strip_scaling(match.bindings["q"]), key=_strip_scaling(match.bindings["kt"]),
                        value=match.bindings["v"], scores=scores, softmax=softmax, context=node,
                        mask=match.bindings.get("mask"),
                        guard=_guard(node),
                    )
                )
                break
    return cores


def movement_source(value: ir.Value) -> tuple[ir.Value, list[ir.Node]]:
    """Walk back through data-movement ops (and constant index Gathers) to the tensor they rearrange."""
    chain = []
    while (node := value.producer()) is not None and node.op_type in MOVEMENT_OPS:
        if node.op_type == "Gather" and (node.inputs[0].const_value is not None or node.inputs[1].const_value is None):
            break  # an embedding lookup, or an index computed at run time: not a rearrangement
        chain.append(node)
        value = node.inputs[0]
    return value, chain


def _rotary_input(value: ir.Value) -> ir.Value | None:
    """The tensor x (before data movement) of a rotary embedding x·cos + rotate_half(x)·sin (Llama's RoPE), else None.

    rotate_half(x) = Concat(−x[..., d/2:], x[..., :d/2]) turns pairs of channels *within* a head, so the head
    axis passes through unchanged: the projection behind x is the block's Q (or K) projection.
    """
    node = value.producer()
    if node is None or node.op_type != "Add":
        return None
    products = [v.producer() for v in node.inputs]
    if any(p is None or p.op_type != "Mul" for p in products):
        return None
    for direct, rotated in (products, products[::-1]):
        halves = [v.producer() for v in rotated.inputs if v.producer() is not None and v.producer().op_type == "Concat"]
        if not halves:
            continue
        sources = {movement_source(_negated(part))[0] for part in halves[0].inputs}
        if len(sources) == 1 and (x := sources.pop()) in {movement_source(v)[0] for v in direct.inputs}:
            return x
    return None


def _negated(value: ir.Value) -> ir.Value:
    node = value.producer()
    return node.inputs[0] if node is not None and node.op_type == "Neg" else value


def _operand_source(value: ir.Value) -> ir.Value:
    """The tensor a core operand rearranges, through data movement and a rotary embedding."""
    source = movement_source(value)[0]
    return _rotary_input(source) or source


def _is_weight(value: ir.Value | None) -> bool:
    return value is not None and value.const_value is not None and value.const_value.size > 1


def _projection_of(source: ir.Value) -> ir.Node | None:
    """The MatMul/Gemm with a constant weight that produced `source` (possibly through a bias Add)."""
    node = source.producer()
    if node is not None and node.op_type == "Add":
        data = [v for v in node.inputs if not _is_weight(v)]
        node = data[0].producer() if len(data) == 1 else None
    if node is not None and node.op_type in ("MatMul", "Gemm") and _is_weight(node.inputs[1]):
        return node
    return None


def _only_consumer(value: ir.Value) -> ir.Node | None:
    """The one node reading `value`'s elements (Shape/Size read only its shape: legacy exports' run-time targets)."""
    users = {use.node for use in value.uses() if use.node.op_type not in ("Shape", "Size")}
    return users.pop() if len(users) == 1 else None


def output_chain(context: ir.Value) -> tuple[ir.Node | None, list[ir.Node]]:
    """Forward from the core's context through data movement to the output projection."""
    chain = []
    value = context
    while (node := _only_consumer(value)) is not None:
        if node.op_type in ("MatMul", "Gemm") and node.inputs[0] is value and _is_weight(node.inputs[1]):
            return node, chain
        if node.op_type not in MOVEMENT_OPS or node.inputs[0] is not value:
            break
        chain.append(node)
        value = node.outputs[0]
    return None, chain


@dataclass(frozen=True)
class AttentionBlock:
    """One multi-head attention block: what head and token pruning rewrite, and `pcc inspect` lists."""

    name: str  # the softmax node, or the fused op
    heads: int
    head_dim: int
    query: str | None  # projection nodes (MatMul/Gemm); None where the walk did not reach one
    key: str | None
    value: str | None
    output: str | None
    softmax: str | None
    probabilities: str | None  # the softmax output, [batch, heads, queries, keys]
    mask: str | None
    residual: str | None  # the Add that closes the block's residual branch
    norm: str | None  # the LayerNormalization right after the residual Add (post-norm) or before Q (pre-norm)
    weights: tuple[str, ...] = ()  # the Q/K/V projection weights (one if fused): what makes a group "heads"
    fused_op: str | None = None  # "domain:op" of a fused attention node
    kv_heads: int = 0  # key/value heads: fewer than `heads` for grouped-query attention; 0 where unknown

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class AttentionBlocks:
    """The result of `FindAttentionBlocks`."""

    META_KEY = "pcc.attention_blocks"
    PRODUCED_BY = "FindAttentionBlocks"

    blocks: list[AttentionBlock]

    def __len__(self) -> int:
        return len(self.blocks)

    def summary(self) -> str:
        if not self.blocks:
            return "none"
        shapes = sorted({(b.heads, b.kv_heads, b.head_dim) for b in self.blocks})
        kinds = ", ".join(f"{h} heads" + (f" ({k} key/value)" if k and k != h else "") + f" x {d}" for h, k, d in shapes)
        return f"{len(self.blocks)} blocks ({kinds})"


def _residual_and_norm(output: ir.Node | None, query: ir.Node | None) -> tuple[str | None, str | None]:
    residual = norm = None
    if output is not None:
        value = output.outputs[0]
        node = _only_consumer(value)
        if node is not None and (node.domain, node.op_type) == ("com.microsoft", "SkipLayerNormalization"):
            return node.name, node.name  # onnxruntime's fusion of the bias, residual Add and LayerNorm
        if node is not None and node.op_type == "Add" and any(_is_weight(v) for v in node.inputs):
            value, node = node.outputs[0], _only_consumer(node.outputs[0])  # the output projection's bias
        while node is not None and node.op_type in MOVEMENT_OPS:  # e.g. back from [L*N, E] to [N, L, E]
            value, node = node.outputs[0], _only_consumer(node.outputs[0])
        if node is not None and node.op_type == "Add" and not any(v.const_value is not None for v in node.inputs):
            residual = node.name
            after = _only_consumer(node.outputs[0])
            if after is not None and after.op_type == "LayerNormalization":
                norm = after.name
    if norm is None and query is not None:
        before = query.inputs[0].producer()
        if before is not None and before.op_type == "LayerNormalization":
            norm = before.name
    return residual, norm


def _block_from_core(core: AttentionCore) -> AttentionBlock:
    projections = [_projection_of(_operand_source(v)) for v in (core.query, core.key, core.value)]
    output, _ = output_chain(core.context.outputs[0])
    context_shape = core.context.outputs[0].shape
    head_dim = context_shape[-1] if context_shape is not None else None
    heads = None
    if output is not None and isinstance(head_dim, int):
        weight = output.inputs[1].const_value
        trans_b = output.op_type == "Gemm" and output.attributes.get_int("transB", 0)
        features = weight.shape[1] if trans_b else weight.shape[0]
        heads = features // head_dim
    elif context_shape is not None and len(context_shape) == 4:
        heads = context_shape[-3]
    kv_heads = None  # from K's own projection; a packed QKV projection (one node) has as many K heads as Q heads
    key_weight = projections[1].inputs[1].const_value if projections[1] is not None else None
    if key_weight is not None and isinstance(head_dim, int) and head_dim and projections[1] is not projections[0]:
        trans_b = projections[1].op_type == "Gemm" and projections[1].attributes.get_int("transB", 0)
        kv_heads = key_weight.shape[0 if trans_b else 1] // head_dim
    residual, norm = _residual_and_norm(output, projections[0])
    return AttentionBlock(
        name=core.softmax.name,
        heads=heads if isinstance(heads, int) else 0,
        head_dim=head_dim if isinstance(head_dim, int) else 0,
        query=projections[0].name if projections[0] else None,
        key=projections[1].name if projections[1] else None,
        value=projections[2].name if projections[2] else None,
        output=output.name if output is not None else None,
        softmax=core.softmax.name,
        probabilities=core.softmax.outputs[0].name,
        mask=core.mask.name if core.mask is not None else None,
        residual=residual,
        norm=norm,
        weights=tuple(dict.fromkeys(p.inputs[1].name for p in projections if p is not None)),
        kv_heads=kv_heads or (heads if isinstance(heads, int) else 0),
    )


def _dim(value: ir.Value | None, axis: int) -> int | None:
    """The static size of `value` along `axis`, or None."""
    if value is None or value.shape is None or not -len(value.shape) <= axis < len(value.shape):
        return None
    dim = value.shape[axis]
    return dim if isinstance(dim, int) else None


def _fused_block(node: ir.Node, heads_attribute: str) -> AttentionBlock:
    """A fused op's block: heads from its attributes (or its 4-D inputs), its weights, and around it the
    output projection, residual and norm found as for an unfused core."""
    op = f"{node.domain or 'ai.onnx'}:{node.op_type}"
    heads = node.attributes.get_int(heads_attribute, 0)
    kv_heads = node.attributes.get_int("kv_num_heads", 0)
    query = node.inputs[0] if node.inputs else None
    head_dim, projections, weights = 0, [None, None, None], ()
    if op == "com.microsoft:Attention":  # x → packed [E, Q+K+V] projection inside the op
        weight = node.inputs[1]
        sizes = node.attributes.get_ints("qkv_hidden_sizes", None)
        features = _dim(weight, 1)
        q_size = sizes[0] if sizes else (features // 3 if features else None)
        head_dim = q_size // heads if q_size and heads else 0
        projections = [node, node, node]
        weights = (weight.name,) if _is_weight(weight) else ()
    elif node.op_type in ("Attention", "MultiHeadAttention"):  # Q, K, V projected outside the op
        rank = len(query.shape) if query is not None and query.shape is not None else 0
        if rank == 4:  # [batch, heads, length, head_dim]
            heads = heads or (_dim(query, 1) or 0)
            kv_heads = kv_heads or (_dim(node.inputs[1], 1) or 0)
            head_dim = _dim(query, 3) or 0
        elif rank == 3 and heads:
            head_dim = (_dim(query, 2) or 0) // heads
        projections = [_projection_of(movement_source(v)[0]) if v is not None else None for v in node.inputs[:3]]
        weights = tuple(dict.fromkeys(p.inputs[1].name for p in projections if p is not None))
    elif query is not None and heads:  # GroupQueryAttention: listed only
        head_dim = (_dim(query, -1) or 0) // heads
    output, _ = output_chain(node.outputs[0])
    residual, norm = _residual_and_norm(output, projections[0])
    return AttentionBlock(
        name=node.name, heads=heads, head_dim=head_dim,
        query=projections[0].name if projections[0] else None,
        key=projections[1].name if projections[1] else None,
        value=projections[2].name if projections[2] else None,
        output=output.name if output is not None else None,
        softmax=None, probabilities=None, mask=None, residual=residual, norm=norm,
        weights=weights, fused_op=op, kv_heads=kv_heads or heads,
    )


def find_attention_blocks(model: ir.Model) -> AttentionBlocks:
    blocks = [_block_from_core(core) for core in find_attention_cores(model)]
    for node in model.graph:
        heads_attribute = _FUSED_OPS.get((node.domain if node.domain != "ai.onnx" else "", node.op_type))
        if heads_attribute is not None:
            blocks.append(_fused_block(node, heads_attribute))
    return AttentionBlocks(blocks)


@dataclass
class FindAttentionBlocks(ir.passes.InPlacePass):
    """Analysis: record every multi-head attention block (heads, head dim, projections, softmax, residual, norm).

    `required_by` names a request that needs attention (e.g. "--prune heads"): a model without any
    rewritable block is then a bad request, not an empty result.
    """

    required_by: str | None = None

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        blocks = find_attention_blocks(model)
        if self.required_by and not any(b.weights for b in blocks.blocks):
            fused = sorted({b.fused_op for b in blocks.blocks if b.fused_op})
            found = f"only fused attention ops pcc cannot rewrite ({', '.join(fused)})" if fused else "none"
            raise InvalidRequestError(
                f"{self.required_by} needs multi-head attention, but the model has no MatMul -> Softmax -> MatMul "
                f"attention core with Q/K/V projections (found: {found}){quantized_model_hint(model)}"
            )
        store(model, blocks)
        return ir.passes.PassResult(model, False)
