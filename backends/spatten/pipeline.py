"""The pruning pipeline of `--target spatten`: one sparsity split between cascade token and head pruning.

`--sparsity S` with `--target spatten` is the average fraction of token x head attention work removed
across the layers: mean over layers of (1 - token_keep[l] x head_keep[l]) = S, where token_keep is the
fraction of the input's tokens a layer sees (PruneTokens) and head_keep the fraction of heads it computes
(CascadeHeads). Both follow SpAtten's cascade schedules (tokens spared in the first 15% of the layers,
heads in the first 30%, then ramps).

The split follows the paper's balance: head pruning is the smaller lever (1.1x against 1.9x for token
pruning in its breakdown; our BERT benchmark setting removes 10% of heads and 35% of tokens), so heads get
a fixed share, head sparsity = `HEAD_SHARE` x S, and the token sparsity is solved numerically (bisection;
the work removed grows monotonically with it) so that the mean above is S. The equation is written on the
schedules' fractions; the passes floor them to whole heads and tokens, and the report shows what was kept.

The split needs the number of attention layers, which is known only once FindAttentionBlocks has run, so
it is done by a pass, `CascadeTokensAndHeads`, which then runs PruneTokens and CascadeHeads with the two
per-layer schedules (a side whose schedule keeps everything is skipped). Before token pruning, a model
exported at a fixed sequence length gets a symbolic one (RelaxSequenceAxis: users often cannot re-export);
with nothing to prune on the token side the model is left as exported.

Token pruning assumes every layer after the first pruned one continues the pruned stream. Some models join
that stream with a tensor that keeps every token (PP-OCR's recognisers add a skip from before their
attention blocks), which only shows when the pruned model runs. So the pass first runs a token-pruned copy
in onnxruntime on random inputs; where it fails, SpAtten's other lever carries the whole budget: heads are
pruned by the cascade schedule at `sparsity`, tokens are kept, and the split says which node forced it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from pcc.compiler.errors import InvalidRequestError
from pcc.compiler.pipeline import Pipeline, preparation_passes
from pcc.passes.analysis.attention import AttentionBlocks, FindAttentionBlocks
from pcc.passes.results import fetch, store
from pcc.passes.transforms.cascade_heads import HEADS_UNPRUNED, CascadeHeads
from pcc.passes.transforms.prune_tokens import TOKENS_UNPRUNED, PruneTokens, cascade_keep_schedule
from pcc.passes.transforms.relax_sequence_axis import RelaxSequenceAxis
from pcc.compiler.options import HEAD_SHARE  # head sparsity = HEAD_SHARE x the requested token x head sparsity

__all__ = ["HEAD_SHARE", "AttentionSparsitySplit", "CascadeTokensAndHeads", "spatten_pipeline", "split_attention_sparsity"]

_BISECTION_STEPS = 60


@dataclass
class AttentionSparsitySplit:
    META_KEY = "pcc.spatten_sparsity_split"
    PRODUCED_BY = "CascadeTokensAndHeads"

    sparsity: float  # requested: mean over layers of 1 - token_keep x head_keep
    token_sparsity: float  # what PruneTokens' schedule removes on average
    head_sparsity: float
    token_keep: list[float]
    head_keep: list[float]
    tokens_refused: str | None = None  # why every token was kept (token pruning cannot apply), else None

    def summary(self) -> str:
        text = (f"token x head attention work -{100 * self.sparsity:.1f}% = tokens -{100 * self.token_sparsity:.1f}%, "
                f"heads -{100 * self.head_sparsity:.1f}% (cascade schedules)")
        return text + (f"; heads only, tokens kept: {self.tokens_refused}" if self.tokens_refused else "")


def _removed(token_keep: list[float], head_keep: list[float]) -> float:
    return float(np.mean(1 - np.asarray(token_keep) * np.asarray(head_keep)))


def split_attention_sparsity(layers: int, sparsity: float, head_share: float = HEAD_SHARE) -> AttentionSparsitySplit:
    """Token and head schedules removing `sparsity` of the token x head work on average over `layers`."""
    if not 0 <= sparsity < 1:
        raise InvalidRequestError(f"--sparsity must be in [0, 1), got {sparsity}")
    if not 0 <= head_share < 1:
        raise InvalidRequestError(f"the heads' share of the sparsity must be in [0, 1), got {head_share}")
    head_sparsity = head_share * sparsity
    head_keep = cascade_keep_schedule(layers, head_sparsity, HEADS_UNPRUNED)
    # PruneTokens' schedule reaches at most (unpruned layers excluded) this average sparsity, exclusive
    reachable = 1 - max(1, int(np.ceil(TOKENS_UNPRUNED * layers))) / layers
    low, high = 0.0, reachable
    if sparsity > 0 and _removed(cascade_keep_schedule(layers, high * (1 - 1e-9), TOKENS_UNPRUNED), head_keep) < sparsity:
        raise InvalidRequestError(
            f"sparsity {sparsity} is out of reach on {layers} attention layer(s): SpAtten's schedules spare the first "
            f"{100 * TOKENS_UNPRUNED:.0f}% of the layers from token pruning and {100 * HEADS_UNPRUNED:.0f}% from head pruning"
        )
    for _ in range(_BISECTION_STEPS if sparsity > 0 else 0):
        middle = (low + high) / 2
        if _removed(cascade_keep_schedule(layers, middle, TOKENS_UNPRUNED), head_keep) < sparsity:
            low = middle
        else:
            high = middle
    token_sparsity = high if sparsity > 0 else 0.0
    token_keep = cascade_keep_schedule(layers, token_sparsity, TOKENS_UNPRUNED)
    return AttentionSparsitySplit(sparsity, token_sparsity, head_sparsity, token_keep, head_keep)


def heads_only_split(layers: int, sparsity: float, tokens_refused: str) -> AttentionSparsitySplit:
    """All of `sparsity` on the heads' cascade schedule, every token kept (token pruning cannot apply)."""
    head_keep = cascade_keep_schedule(layers, sparsity, HEADS_UNPRUNED)
    return AttentionSparsitySplit(sparsity, 0.0, sparsity, [1.0] * layers, head_keep, tokens_refused)


def token_pruning_failure(
    model: ir.Model, keep: list[float], batch: int, length: int, input_shapes: Mapping[str, tuple[int, ...]]
) -> str | None:
    """Why tokens cannot be pruned by `keep`: PruneTokens refuses a copy of `model` (its sequence length is
    computed, e.g. by a strided convolution over audio frames, not an input axis), or the pruned copy does not
    run on random inputs (batch x length, or `input_shapes`). None where it runs (or where the dense model
    does not run at those sizes either: nothing to blame)."""
    from pcc.backends.onnx.runtime import failing_node, random_inputs, session

    dense_proto = ir.serde.serialize_model(model)
    pruned_model = ir.serde.deserialize_model(dense_proto)
    try:
        RelaxSequenceAxis()(pruned_model)
        FindAttentionBlocks()(pruned_model)  # analysis results do not travel with a copy
        PruneTokens(keep=tuple(keep))(pruned_model)
    except InvalidRequestError as refusal:
        return str(refusal).split(": run ")[0]  # the advice to the API user does not apply here
    pruned = session(ir.serde.serialize_model(pruned_model).SerializeToString())
    try:
        pruned.run(None, random_inputs(pruned, symbolic=batch, length=length, shapes=input_shapes))
    except Exception as error:  # onnxruntime's own error types
        try:
            dense = session(dense_proto.SerializeToString())
            dense.run(None, random_inputs(dense, symbolic=batch, length=length, shapes=input_shapes))
        except Exception:  # the dense model fails at these sizes too: the probe says nothing
            return None
        return f"{failing_node(error)} fails in onnxruntime once tokens are removed"
    return None


@dataclass
class CascadeTokensAndHeads(ir.passes.InPlacePass):
    """Transform: SpAtten's cascade token then head pruning removing `sparsity` of the token x head attention
    work on average over the layers, split by `split_attention_sparsity` (needs FindAttentionBlocks)."""

    sparsity: float
    head_share: float = HEAD_SHARE
    batch: int = 1  # the random inputs the token-pruned copy is tried on
    length: int = 128
    input_shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    split: AttentionSparsitySplit | None = field(default=None, init=False)

    def requires(self, model: ir.Model) -> None:
        fetch(model, AttentionBlocks)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        blocks = fetch(model, AttentionBlocks).blocks
        if not blocks:
            raise InvalidRequestError("cascade token and head pruning needs multi-head attention, but the model has none")
        self.split = split_attention_sparsity(len(blocks), self.sparsity, self.head_share)
        if min(self.split.token_keep) < 1:
            failure = token_pruning_failure(model, self.split.token_keep, self.batch, self.length, self.input_shapes)
            if failure is not None:
                self.split = heads_only_split(len(blocks), self.sparsity, failure)
        modified = False
        # tokens first: head pruning drops the static head counts that PruneTokens reads from the shapes
        if min(self.split.token_keep) < 1:
            modified |= RelaxSequenceAxis()(model).modified  # a fixed-length export: its length becomes symbolic
            modified |= PruneTokens(keep=tuple(self.split.token_keep))(model).modified
            FindAttentionBlocks()(model)  # PruneTokens invalidated them; CascadeHeads reads them
        if min(self.split.head_keep) < 1:
            modified |= CascadeHeads(keep=tuple(self.split.head_keep))(model).modified
        store(model, self.split)
        return ir.passes.PassResult(model, modified)


def spatten_pipeline(
    sparsity: float, head_share: float = HEAD_SHARE, batch: int = 1, length: int = 128,
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> Pipeline:
    """Preparation, attention blocks (a model without any is a one-line error naming --target spatten) and
    cascade token + head pruning at `sparsity` of the token x head attention work (token pruning tried first
    on random inputs of `batch` x `length`, or `input_shapes` where given). A QDQ-quantized file stays lifted to
    float (`FoldQuantization`): SpAtten quantizes the attention itself, and the emulation models that."""
    shapes = dict(input_shapes or {})
    return Pipeline([
        *preparation_passes(length, shapes),
        FindAttentionBlocks(required_by="--target spatten"),
        CascadeTokensAndHeads(sparsity, head_share, batch, length, shapes),
    ])
