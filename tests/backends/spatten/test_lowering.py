"""Lowering a cascade-pruned transformer: one request per (layer, kept head), the kept-token counts the pruned
graph really computes with, bit widths, measured re-quantization per layer, the RTL CSV round trip."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pcc.backends.spatten import EmulateProgressiveQuantization, Program, lower_to_program
from pcc.backends.spatten.lowering import NO_ATTENTION, attention_work_removed
from pcc.compiler.errors import InvalidRequestError
from pcc.compiler.pipeline import Pipeline, analysis_pipeline, preparation_passes
from pcc.passes.analysis import FindAttentionBlocks
from pcc.passes.transforms import CascadeHeads, PruneTokens
from tests.conftest import run_onnx

TOKENS = (1.0, 0.75, 0.5, 0.25)
HEADS = (1.0, 1.0, 0.5, 0.5)


def _pruned(exported, tokens=TOKENS, heads=HEADS):
    passes = [*preparation_passes(), FindAttentionBlocks(required_by="test")]
    if tokens is not None:
        passes += [PruneTokens(keep=tokens), FindAttentionBlocks()]
    return Pipeline([*passes, CascadeHeads(keep=heads)]).run(exported.model())


def test_requests_follow_the_kept_heads_and_tokens(encoder):
    program = lower_to_program(_pruned(encoder), 40, requant_fractions=[0.5, 0.25, 0.0, 0.1], name="encoder")
    assert (program.mode, program.layers, program.heads, program.head_dim) == ("bert", 4, 4, 8)
    assert [(r.layer_id, r.head_id) for r in program.requests] == [(l, h) for l, n in enumerate([4, 4, 2, 2]) for h in range(n)]
    keys = {r.layer_id: r.key_fetch_num for r in program.requests}
    assert keys == {0: 40, 1: 30, 2: 20, 3: 10} and {r.sentence_length_L for r in program.requests} == {40}
    assert all(r.value_fetch_num == r.key_fetch_num for r in program.requests)  # BERT: every kept value
    first = program.requests[0]
    assert (first.quant_key_bit, first.quant_query_bit, first.quant_value_bit) == (8, 16, 8)
    assert (first.auto_requant_thres, first.auto_requant_incre) == (0.1, 4)
    assert [(r.requant_fraction, r.if_requant) for r in program.requests if r.head_id == 0] == [
        (0.5, True), (0.25, True), (0.0, False), (0.1, True)]
    # the cascade top-k runs once after each layer whose successor keeps fewer tokens, picking its tokens
    assert [(r.layer_id, r.topk) for r in program.requests if r.if_topk] == [(0, 30), (1, 20), (2, 10)]
    assert attention_work_removed(program) == pytest.approx(1 - np.mean([1, 0.75, 0.25, 0.125]))


def test_kept_counts_are_what_the_pruned_graph_computes(encoder):
    """The functional model's row counts (batch x heads x queries, keys per row) at L = 33 match the program."""
    result = _pruned(encoder)
    length, batch = 33, 2
    program = lower_to_program(result, length)
    EmulateProgressiveQuantization()(result.model)
    x = np.random.default_rng(0).standard_normal((batch, length, 32), dtype=np.float32)
    counts = run_onnx(result.model, {result.model.graph.inputs[0].name: x})[-1]
    for layer, (_, rows, keys) in enumerate(counts):
        requests = [r for r in program.requests if r.layer_id == layer]
        assert keys == requests[0].key_fetch_num == max(1, math.floor(length * TOKENS[layer]))
        assert rows == batch * len(requests) * keys  # self-attention: every kept token is a query


def test_tiny_gpt_heads_only(tiny_gpt):
    program = lower_to_program(_pruned(tiny_gpt, tokens=None, heads=(1.0, 0.5)), 12, tau=0.0)
    assert [(r.layer_id, r.head_id) for r in program.requests] == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1)]
    assert {r.key_fetch_num for r in program.requests} == {12} and not any(r.if_topk for r in program.requests)
    assert {(r.auto_requant_thres, r.auto_requant_incre, r.if_requant) for r in program.requests} == {(-1.0, -1, False)}


def test_program_round_trips_through_json_and_the_rtl_csv(encoder):
    program = lower_to_program(_pruned(encoder), 64, requant_fractions=[0.2, 0.0, 0.0, 0.0])
    assert Program.from_json(program.to_json()) == program
    back = Program.from_csv(program.to_csv(), mode="bert", layers=4, heads=4)
    strip = lambda p: [r.__dict__ | {"requant_fraction": None} for r in p.requests]  # the CSV carries a flag only
    assert strip(back) == strip(program)


def test_model_without_attention_and_bad_fractions(zoo_cache, encoder):
    result = analysis_pipeline().run(zoo_cache.model("resnet_basic"))
    with pytest.raises(InvalidRequestError, match="--target spatten needs multi-head attention") as error:
        lower_to_program(result, 16)
    assert str(error.value) == NO_ATTENTION and "\n" not in NO_ATTENTION
    with pytest.raises(InvalidRequestError, match="only with progressive quantization"):
        lower_to_program(_pruned(encoder), 16, tau=0.0, requant_fractions=[0.1, 0, 0, 0])
    with pytest.raises(InvalidRequestError, match="4 attention layers"):
        lower_to_program(_pruned(encoder), 16, requant_fractions=[0.1])
