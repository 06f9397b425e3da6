"""The cycle/energy model: hand-computed cases, pruned vs dense, re-quantization, tiling, speed."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest

from pcc.backends.spatten import (
    EIGHTH, FULL, HeadRequest, Program, dense_program, expected_topk, program_from_schedule, simulate,
)

GPT2_KEEP = [0.9, 0.7] + [0.2] * 4 + [0.1] * 6
# Cascade schedules in SpAtten's shape: tokens kept by every layer for the first 15%, heads for the first 30%.
BERT_TOKENS = [1.0, 1.0, 0.9, 0.8, 0.7, 0.65, 0.6, 0.55, 0.5, 0.45, 0.4, 0.35]
BERT_HEADS = [1.0] * 4 + [0.95, 0.9, 0.9, 0.85, 0.8, 0.8, 0.75, 0.75]


def one_request(mode="bert", L=64, keys=64, values=64, key_bits=-1, value_bits=-1, fraction=0.0, D=64, topk=-1):
    request = HeadRequest(0, 0, 0, D, L, keys, key_bits, -1, 0.05 if fraction else -1.0, fraction > 0,
                          4 if fraction else -1, values, value_bits, False, False, topk > 0, topk, fraction)
    return Program(mode=mode, layers=1, heads=1, head_dim=D, requests=[request])


def bert(tokens=BERT_TOKENS, heads=BERT_HEADS, seq_len=384, **quant):
    return program_from_schedule("bert", 12, 12, 64, seq_len, tokens, heads, **quant)


def gpt2(prompt_stage=True):
    return program_from_schedule("gpt2", 12, 12, 64, 992, GPT2_KEEP, [1.0] * 12, 0.2, 6, 4, 0.07, 0.05, 32,
                                 prompt_stage=prompt_stage)


def assert_consistent(result):
    assert sum(result.cycle_breakdown.values()) == pytest.approx(result.cycles)
    assert sum(result.dram_breakdown.values()) == pytest.approx(result.dram_bytes)
    assert sum(result.energy_breakdown.values()) == pytest.approx(result.energy_j)
    for parts in (result.per_layer, result.per_iteration):
        assert sum(p.cycles for p in parts) == pytest.approx(result.cycles)
        assert sum(p.dram_bytes for p in parts) == pytest.approx(result.dram_bytes)
        assert sum(p.energy_j for p in parts) == pytest.approx(result.energy_j)
    assert result.seconds == pytest.approx(result.cycles * 1e-9)


def test_one_dense_head_by_hand():
    # 64 queries x 64 keys x D=64: Q x K 64 * ceil(64*64/512) = 512, softmax 64 * 64/8 = 512, prob x V 512;
    # DRAM (64*64*16 + 2 * 64*64*12) / 8 = 20480 B = 40 cycles at 512 B/cycle; fill/drain 103 + 64/8.
    result = simulate(one_request())
    assert result.dram_bytes == 20480
    assert result.unit_busy_cycles == {"dram": 40, "qk": 512, "softmax": 512, "pv": 512, "topk": 0}
    assert result.cycles == 512 + 111
    assert result.cycle_breakdown["qk"] == 512 and result.cycle_breakdown["fill_drain"] == 111
    assert simulate(one_request(), replace(FULL, overlap_fetch=False)).cycles == 40 + 512 + 111  # bert.cpp's sum
    assert result.energy_breakdown["dram"] == pytest.approx(20480 * 8 * 3.9e-12)
    assert_consistent(result)


def test_value_pruning_charges_the_top_k_engine_per_query():
    # One generation query over 1024 keys keeping 307 values: top-k 318.04 cycles beats DRAM
    # (128 + 1024*48 + 307*48) / 512 = 125.03 and Q x K 128, so the request is top-k bound.
    result = simulate(one_request("gpt2", L=1024, keys=1024, values=307, key_bits=6, value_bits=6))
    topk = float(expected_topk(1024, 307).cycles)
    assert result.dram_bytes == 128 + 1024 * 48 + 307 * 48
    assert result.cycles == pytest.approx(topk + 103 + 128)
    assert result.cycle_breakdown["topk"] == pytest.approx(topk)
    assert_consistent(result)


def test_requant_adds_the_predicted_lsb_bytes():
    # One query: a fraction f of such requests fetch K*D*4/8 LSB bytes each.
    gen = program_from_schedule("gpt2", 12, 12, 64, 992, GPT2_KEEP, [1.0] * 12, 0.2, 6, 4, 0.0, 0.05, 8,
                                prompt_stage=False)
    half = program_from_schedule("gpt2", 12, 12, 64, 992, GPT2_KEEP, [1.0] * 12, 0.2, 6, 4, 0.5, 0.05, 8,
                                 prompt_stage=False)
    extra = sum(r.key_fetch_num * 64 * 4 / 8 for r in half.requests if r.if_requant)
    assert sum(r.if_requant for r in half.requests) == len(half.requests) // 2
    assert simulate(half).dram_bytes - simulate(gen).dram_bytes == pytest.approx(extra)
    # and redo Q x K for that one row: ceil(K*64/512) cycles each. On SpAtten that hides behind the top-k
    # engine; on SpAtten 1/8 (Q x K bound) it shows on the critical path.
    redo = sum(-(-r.key_fetch_num * 64 // 512) for r in half.requests if r.if_requant)
    assert simulate(half).unit_busy_cycles["qk"] - simulate(gen).unit_busy_cycles["qk"] == redo
    assert simulate(half).cycle_breakdown["requant"] == 0
    assert simulate(half, EIGHTH).cycle_breakdown["requant"] > 0 == simulate(gen, EIGHTH).cycle_breakdown["requant"]
    # Many query rows: the LSBs come once if any of the Q rows needs them, 1 - (1 - f)^Q of the time.
    rows = [simulate(one_request(L=10, keys=10, values=10, key_bits=8, fraction=f)) for f in (0.0, 0.5)]
    assert rows[1].dram_bytes - rows[0].dram_bytes == pytest.approx((1 - 0.5 ** 10) * 10 * 64 * 4 / 8)
    assert rows[1].unit_busy_cycles["qk"] == 1.5 * rows[0].unit_busy_cycles["qk"]  # half the rows redone


def test_pruned_beats_dense_and_breakdowns_add_up():
    for pruned in (bert(msb_bits=8, requant_fraction=0.06, tau=0.1), gpt2()):
        dense = dense_program(pruned)
        for config in (FULL, EIGHTH):
            p, d = simulate(pruned, config), simulate(dense, config)
            assert p.cycles < d.cycles and p.dram_bytes < d.dram_bytes and p.energy_j < d.energy_j
            assert_consistent(p)
            assert_consistent(d)
    p, d = simulate(bert(msb_bits=8, requant_fraction=0.06, tau=0.1)), simulate(dense_program(bert()))
    # Regression values of this model (the bench prints them next to the paper's).
    assert d.dram_bytes / p.dram_bytes == pytest.approx(1.876, abs=0.002)
    assert d.cycles / p.cycles == pytest.approx(2.092, abs=0.002)
    p, d = simulate(gpt2()), simulate(dense_program(gpt2()))
    assert d.dram_bytes / p.dram_bytes == pytest.approx(11.690, abs=0.002)
    assert d.cycles / p.cycles == pytest.approx(6.268, abs=0.002)
    assert len(p.per_iteration) == 33 and len(p.per_layer) == 12


def test_long_sequences_are_tiled():
    # 2048 keys at D=64 need two SRAM tiles: one more drain, and the query is streamed past both.
    short, long = (simulate(one_request("gpt2", L=n, keys=n, values=n)) for n in (1024, 2048))
    assert short.cycle_breakdown["fill_drain"] == 103 + 128
    assert long.cycle_breakdown["fill_drain"] == 2 * (103 + 128)
    assert long.dram_breakdown["query"] == 2 * short.dram_breakdown["query"]
    # D = 128 halves the rows a tile holds: 1024 keys already need two.
    wide = simulate(one_request("gpt2", L=1024, keys=1024, values=1024, D=128))
    assert wide.cycle_breakdown["fill_drain"] == 2 * (103 + 64)


def test_eighth_is_slower_than_full():
    for program in (bert(), gpt2()):
        full, eighth = simulate(program, FULL), simulate(program, EIGHTH)
        assert eighth.cycles > 6 * full.cycles
    compute_bound = bert(tokens=[1.0] * 12, heads=[1.0] * 12)
    assert simulate(compute_bound, EIGHTH).cycles / simulate(compute_bound, FULL).cycles == pytest.approx(8, rel=0.01)


def test_simulation_is_fast():
    program = bert(seq_len=512, msb_bits=8, requant_fraction=0.06, tau=0.1)
    start = time.perf_counter()
    simulate(program), simulate(dense_program(program)), simulate(program, EIGHTH)
    assert time.perf_counter() - start < 3
    generation = gpt2()  # 4752 requests
    start = time.perf_counter()
    simulate(generation)
    assert time.perf_counter() - start < 3


def test_result_serialises():
    result = simulate(gpt2(prompt_stage=False)).to_dict()
    assert result["config"] == "SpAtten" and result["mode"] == "gpt2"
    assert set(result["cycle_breakdown"]) == {"dram", "qk", "softmax", "pv", "topk", "requant", "fill_drain"}
    assert result["average_power_w"] == pytest.approx(result["energy_j"] / result["seconds"])
