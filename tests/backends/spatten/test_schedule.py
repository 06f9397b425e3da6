"""Programs from a pruning schedule, and dense baselines."""

from __future__ import annotations

import pytest

from pcc.backends.spatten import dense_program, program_from_schedule, simulate

GPT2_KEEP = [0.9, 0.7] + [0.2] * 4 + [0.1] * 6  # the RTL's GPT-2-small WikiText-2 trace


def gpt2_generation():
    return program_from_schedule("gpt2", 12, 12, 64, 992, GPT2_KEEP, [1.0] * 12, 0.2, 6, 4, 0.07, 0.05, 32,
                                 prompt_stage=False)


def test_gpt2_schedule_fetches_what_the_trace_fetches():
    program = gpt2_generation()
    last_step = [r for r in program.requests if r.iteration_id == 31 and r.head_id == 0]
    assert [r.key_fetch_num for r in last_step] == [921, 716] + [204] * 4 + [102] * 6
    assert [r.value_fetch_num for r in last_step] == [184, 143] + [40] * 4 + [20] * 6
    assert {r.sentence_length_L for r in program.requests} == set(range(993, 1025))
    dense, pruned = simulate(dense_program(program)), simulate(program)
    assert dense.keys_fetched / pruned.keys_fetched == pytest.approx(3.95, rel=0.02)  # paper: 3.95x
    assert dense.values_fetched / pruned.values_fetched == pytest.approx(20.0, rel=0.02)  # paper: 20x
    assert dense.keys_fetched / pruned.keys_fetched == pytest.approx(1008.5 / (3065 / 12))


def test_token_top_k_sits_where_the_trace_puts_it():
    # The trace's step 1: a top-k after the last head of layers 0, 1 and 5 (next layer keeps fewer) and one
    # after layer 11 that picks the next step's 921 tokens over the whole context, rescaling old scores.
    step = [r for r in gpt2_generation().requests if r.iteration_id == 1]
    assert [(r.layer_id, r.head_id, r.topk) for r in step if r.if_topk] == [(0, 11, 716), (1, 11, 204), (5, 11, 102),
                                                                          (11, 11, 921)]
    assert [(r.layer_id, r.head_id) for r in step if r.if_rescale_previous_importance] == [(11, 11)]
    assert all(r.if_accumulate_importance for r in step)
    last = [r for r in gpt2_generation().requests if r.iteration_id == 31 and r.head_id == 0]
    assert [r.if_accumulate_importance for r in last] == [True] * 6 + [False] * 6  # nothing ranks later


def test_requant_flags_are_spread_to_the_exact_fraction():
    flags = [r.if_requant for r in gpt2_generation().requests]
    assert sum(flags) == int(0.07 * len(flags))  # 322 of 4608, the trace flags 7.0%
    assert all(r.requant_fraction == float(r.if_requant) for r in gpt2_generation().requests)
    assert max(sum(flags[i:i + 100]) for i in range(0, len(flags), 100)) <= 8  # spread, not bunched


def test_cascade_prunes_monotonically_with_a_top_k_where_the_next_layer_keeps_fewer():
    program = program_from_schedule("bert", 4, 4, 64, 100, [1.0, 0.6, 0.6, 0.3], [1.0, 1.0, 0.5, 0.5], msb_bits=8,
                                    requant_fraction=0.1, tau=0.1)
    by_layer = {layer: [r for r in program.requests if r.layer_id == layer] for layer in range(4)}
    assert [len(by_layer[l]) for l in range(4)] == [4, 4, 2, 2]
    assert [by_layer[l][0].key_fetch_num for l in range(4)] == [100, 60, 60, 30]
    topks = [(r.layer_id, r.head_id, r.topk) for r in program.requests if r.if_topk]
    assert topks == [(0, 3, 60), (2, 1, 30)]  # after the last head, keeping the next layer's tokens
    assert [by_layer[l][0].if_accumulate_importance for l in range(4)] == [True, True, True, False]
    assert all(r.requant_fraction == 0.1 and r.if_requant for r in program.requests)
    assert all(r.value_fetch_num == r.key_fetch_num for r in program.requests)  # BERT fetches every kept value


def test_dense_program_is_the_unpruned_twin():
    pruned = program_from_schedule("gpt2", 2, 4, 64, 30, [1.0, 0.5], [1.0, 0.5], 0.25, 6, 4, 0.1, 0.05, 3)
    dense = dense_program(pruned)
    assert len(dense.requests) == 4 * 2 * 4 and dense.prompt_stage
    assert all(r.key_fetch_num == r.value_fetch_num == r.sentence_length_L for r in dense.requests)
    assert all(r.quant_key_bit == r.quant_value_bit == -1 for r in dense.requests)
    assert not any(r.if_requant or r.if_topk or r.if_accumulate_importance for r in dense.requests)
    assert [r.sentence_length_L for r in dense.requests[::8]] == [30, 31, 32, 33]


def test_schedules_that_cannot_run_are_refused():
    with pytest.raises(ValueError, match="one fraction per layer"):
        program_from_schedule("bert", 2, 2, 64, 10, [1.0], [1.0, 1.0])
    with pytest.raises(ValueError, match="value_keep"):
        program_from_schedule("bert", 1, 2, 64, 10, [1.0], [1.0], value_keep=0.5)
    with pytest.raises(ValueError, match="tau"):
        program_from_schedule("gpt2", 1, 2, 64, 10, [1.0], [1.0], requant_fraction=0.1, generated_tokens=2)
