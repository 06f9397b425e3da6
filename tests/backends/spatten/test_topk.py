"""The top-k engine: exact mean cycles, seeded runs, both pivot rules, and what it keeps."""

from __future__ import annotations

import math
from functools import cache

import numpy as np
import pytest

from pcc.backends.spatten import expected_topk, topk_cycles, topk_select


@cache
def brute_mean(m: int, t: int) -> float:
    """The recurrence written out directly: pivot rank r uniform over 0..m-1."""
    rest = sum(brute_mean(r, t) if r > t else brute_mean(m - 1 - r, t - 1 - r) for r in range(m) if r != t)
    return math.ceil(m / 16) + 3 + rest / m


def test_exact_means_reproduce_the_rtl_latency_model():
    # The RTL's TopKLatencyModel.scala averages 100 draws: ~245 and ~56.
    e = expected_topk([1024, 128], [307, 64])
    assert e.select_cycles == pytest.approx([247.0403, 55.0384], abs=1e-3)
    assert list(e.compact_cycles) == [1024 / 16 + 7, 128 / 16 + 7]
    assert e.cycles == pytest.approx([318.0403, 70.0384], abs=1e-3)


def test_exact_mean_equals_the_plain_recurrence():
    for n in (1, 2, 7, 17, 40):
        ks = np.arange(1, n)  # k = n is a bypass
        if ks.size:
            assert expected_topk(n, ks).select_cycles == pytest.approx([brute_mean(n, k - 1) for k in ks])
    assert expected_topk(64, 64).cycles == 0 and expected_topk(64, 200).cycles == 0


@pytest.mark.parametrize("rule", ["uniform", "stream"])
@pytest.mark.parametrize(("n", "k"), [(1024, 307), (128, 64)])
def test_sampled_mean_matches_the_exact_mean_on_random_scores(rule, n, k):
    draws = [topk_select(np.random.default_rng(s).random(n), k, pivot=rule, seed=s).select_cycles for s in range(1000)]
    assert np.mean(draws) == pytest.approx(float(expected_topk(n, k).select_cycles), rel=0.04)


def test_seeded_runs_are_pinned():
    # One draw each (numpy's PCG64 streams); the spread is wide, so these are far from the means.
    assert [topk_cycles(1024, 307, seed=0, pivot=r) for r in ("uniform", "stream")] == [294, 413]
    assert [topk_cycles(128, 64, seed=0, pivot=r) for r in ("uniform", "stream")] == [93, 74]
    assert topk_cycles(1024, 307, seed=0) == topk_cycles(1024, 307, seed=0)


def test_stream_pivot_on_sorted_scores_walks_one_element_per_round():
    # 16 candidates fit one row, so the stream rule's pivot is the first candidate: on descending scores
    # each round removes only the pivot. k=4 takes 4 rounds of ceil(16/16)+3 cycles, then compaction 1+7.
    result = topk_select(np.arange(16.0)[::-1], 4, pivot="stream", seed=123)
    assert (result.rounds, result.select_cycles, result.compact_cycles, result.cycles) == (4, 16, 8, 24)
    assert list(result.indices) == [0, 1, 2, 3]
    # The biased pivot costs more on ordered scores than the uniform one does.
    ordered = [topk_select(np.arange(1024.0), 307, pivot="stream", seed=s).select_cycles for s in range(300)]
    assert np.mean(ordered) > 1.1 * float(expected_topk(1024, 307).select_cycles)


def test_keeps_the_k_largest_in_input_order():
    scores = np.random.default_rng(5).random(1000)
    for rule in ("uniform", "stream"):
        kept = topk_select(scores, 100, pivot=rule, seed=1).indices
        assert list(kept) == sorted(np.argsort(-scores)[:100])
    ties = np.array([1.0, 3.0, 2.0, 3.0, 2.0, 2.0, 0.0])
    assert list(topk_select(ties, 4).indices) == [1, 2, 3, 4]  # first-come among the tied 2.0s
    full = topk_select(ties, 7)
    assert list(full.indices) == list(range(7)) and full.cycles == 0
    with pytest.raises(ValueError):
        topk_select(ties, 0)
