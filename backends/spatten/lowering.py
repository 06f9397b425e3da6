"""Lowering a pruned transformer to the SpAtten program its attention layers execute.

Cascade pruning in pcc is dynamic (PruneTokens and CascadeHeads pick tokens and heads per input at run
time), but *how many* survive at each layer is static: floor(L x token_keep[l]) tokens and
head_kept[l] heads. That is all the hardware's requests depend on, so lowering reads the two pruning
reports and the attention blocks' shapes and hands them to `program_from_schedule`, which owns the request
conventions (BERT mode: one iteration, every kept token a query; cascade top-k after a layer whose
successor keeps fewer tokens; keys at `msb_bits` with `lsb_bits` more on re-quantization). Requests of
heads CascadeHeads dropped are not issued.

What the reports cannot say is how often a row needs the key LSBs: that is measured by running the
emulated model (`EmulateProgressiveQuantization`) and passed in per layer; each request of layer l then
carries layer l's measured fraction.

Local value pruning is not lowered: in BERT mode every query row keeps different values and the union is
nearly all of them, so the hardware model fetches every kept value (as the RTL's BERT model does).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from pcc.backends.spatten.program import Program
from pcc.backends.spatten.schedule import program_from_schedule
from pcc.compiler.errors import InvalidRequestError
from pcc.compiler.pipeline import PipelineResult
from pcc.passes.analysis.attention import AttentionBlocks
from pcc.passes.transforms.cascade_heads import CascadeHeadsReport
from pcc.passes.transforms.prune_tokens import TokenPruneReport

__all__ = ["NO_ATTENTION", "attention_shape", "attention_work_removed", "lower_to_program"]

NO_ATTENTION = (
    "--target spatten needs multi-head attention (a MatMul -> Softmax -> MatMul core with Q/K/V projections), "
    "but the model has none"
)


def attention_shape(result: PipelineResult) -> tuple[int, int, int]:
    """(layers, heads, head dim) of the attention blocks the pipeline found; one head shape for all layers."""
    found = result.get(AttentionBlocks)
    blocks = [b for b in found.blocks if b.weights] if found is not None else []
    if not blocks:
        raise InvalidRequestError(NO_ATTENTION)
    shapes = {(b.heads, b.head_dim) for b in blocks}
    if len(shapes) != 1 or min(min(shapes)) < 1:
        raise InvalidRequestError(f"--target spatten needs one known head count and head dimension in every layer, "
                                  f"found (heads, head dim) {sorted(shapes)}")
    heads, head_dim = shapes.pop()
    return len(blocks), heads, head_dim


def lower_to_program(
    result: PipelineResult,
    seq_len: int,
    *,
    msb_bits: int = 8,
    lsb_bits: int = 4,
    tau: float = 0.1,
    requant_fractions: Sequence[float] | None = None,
    query_bits: int = 16,
    name: str = "",
) -> Program:
    """The BERT-mode program of a model pruned by PruneTokens and/or CascadeHeads (either may be absent:
    nothing of that kind was removed), for sentences of `seq_len` tokens. `requant_fractions`: per layer, the
    measured fraction of query rows that needed the key LSBs (None: none did); tau <= 0 turns progressive
    quantization off (keys at `msb_bits` only)."""
    layers, heads, head_dim = attention_shape(result)
    tokens, cascade = result.get(TokenPruneReport), result.get(CascadeHeadsReport)
    token_keep = tokens.keep if tokens is not None else [1.0] * layers
    head_keep = [kept / cascade.heads for kept in cascade.kept] if cascade is not None else [1.0] * layers
    fractions = list(requant_fractions) if requant_fractions is not None else [0.0] * layers
    if len(token_keep) != layers or len(head_keep) != layers or len(fractions) != layers:
        raise InvalidRequestError(
            f"the pruning reports and re-quantization fractions describe {len(token_keep)}, {len(head_keep)} and "
            f"{len(fractions)} layers, the model has {layers} attention layers"
        )
    if tau <= 0 and any(f > 0 for f in fractions):
        raise InvalidRequestError("rows can need the key LSBs only with progressive quantization on (tau > 0)")
    if seq_len < 1:
        raise InvalidRequestError(f"the sequence length must be at least 1, got {seq_len}")
    program = program_from_schedule(
        "bert", layers, heads, head_dim, seq_len, token_keep, head_keep, msb_bits=msb_bits, lsb_bits=lsb_bits,
        tau=tau, query_bits=query_bits, name=name,
    )
    program.requests = [
        replace(r, if_requant=fractions[r.layer_id] > 0, requant_fraction=fractions[r.layer_id]) for r in program.requests
    ]
    program.metadata = {"token_keep": list(token_keep), "head_kept": [round(k * heads) for k in head_keep],
                        "requant_fraction_per_layer": fractions}
    return program


def attention_work_removed(program: Program) -> float:
    """Mean over layers of 1 - (keys fetched / L) x (heads issued / heads): the token x head work a BERT-mode
    program removes, in whole tokens and heads."""
    kept = np.zeros(program.layers)
    for request in program.requests:
        kept[request.layer_id] += request.key_fetch_num / request.sentence_length_L / program.heads
    return float(np.mean(1 - kept))
