"""Cycle model of SpAtten's top-k engine: quick-select with a random pivot, then an order-keeping compaction.

The engine keeps the k largest of n scores (token importance for cascade pruning, or one query's attention
probabilities for local value pruning) and emits their positions in the original order.

Selection. Each round streams the surviving candidates past `comparators` comparators (16 in SpAtten),
which compare them with the round's pivot; two zero eliminators pack the "above" and "below" candidates,
in order, into two FIFOs; the next round reads the FIFO that holds the k-th largest. A round costs
ceil(n / comparators) + 3 cycles: `ROUND_OVERHEAD` is the comparator register, the zero eliminator and the
FIFO write, as in the RTL's latency model (`hardware/.../sim/TopKLatencyModel.scala`), which is what the
RTL's simulation charges per request (through `TopKDummy`). It ends when the pivot is the k-th largest.

Pivot rules, both taken from the public RTL:
- "uniform" (default): a surviving candidate drawn uniformly at random, as TopKLatencyModel.scala and the
  C++ model (bert.cpp) do. Its mean cycle count has an exact recurrence (`expected_topk`), which the
  simulator uses; averaged over draws it is 247.0 cycles for n=1024, k=307 and 55.0 for n=128, k=64,
  the RTL model's ~245 and ~56 (it averages 100 draws).
- "stream": the RTL's hardware sampler (QuickSelect.scala, RandomPivot): as rows of `comparators`
  candidates stream past, row j replaces the held pivot with probability 2^-ceil(log2(j+1)) (a cheap
  reservoir: row 0 always, row 1 1/2, rows 2-3 1/4, ...) and the pivot is the first candidate of the last
  row taken. The RTL draws from a hash of a counter; here from numpy. We re-sample it every round; the
  public RTL samples only while the input is filled, which looks unfinished (a second round would reuse
  the first pivot). On random scores both rules give every surviving rank the same chance, so their
  cycle distributions are identical; they differ on ordered scores (scores correlated with position).

Compaction (not in the RTL's latency model; we count it). The selection yields a threshold, not the kept
positions. TopK.scala then streams all n candidates once more: compare with the threshold, a prefix sum
that keeps just enough ties, a zero eliminator that packs the kept ones in order. That pass costs
ceil(n / comparators) cycles plus `COMPACTION_DEPTH` = 7 pipeline registers (compare 1, tie prefix sum 1,
input register 1, zero eliminator 2 in its low-latency policy, realign 1, output 1). The RTL's simulation
pays the same stream as TopKDummy's output, one row per cycle after the latency.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

__all__ = [
    "COMPACTION_DEPTH", "ROUND_OVERHEAD", "ExpectedTopK", "PivotRule", "TopKResult", "compaction_cycles",
    "expected_topk", "topk_cycles", "topk_select",
]

ROUND_OVERHEAD = 3
COMPACTION_DEPTH = 7

PivotRule = Literal["uniform", "stream"]


@dataclass(frozen=True)
class TopKResult:
    """One run of the engine on concrete scores."""

    indices: np.ndarray  # positions of the k largest scores, ascending (the engine keeps input order)
    rounds: int
    select_cycles: int  # quick-select rounds: what the RTL's latency model counts
    compact_cycles: int  # the order-keeping pass that emits the positions

    @property
    def cycles(self) -> int:
        return self.select_cycles + self.compact_cycles


def compaction_cycles(n: int | np.ndarray, comparators: int = 16) -> int | np.ndarray:
    return -(-n // comparators) + COMPACTION_DEPTH


def _pivot_position(size: int, comparators: int, rule: PivotRule, rng: np.random.Generator) -> int:
    if rule == "uniform":
        return int(rng.integers(size))
    if rule == "stream":
        rows = -(-size // comparators)
        keep_odds = np.exp2(np.ceil(np.log2(np.arange(1, rows + 1))))  # 1, 2, 4, 4, 8, 8, 8, 8, ...
        taken = np.flatnonzero(rng.random(rows) * keep_odds < 1)  # row 0 is always taken
        return int(taken[-1]) * comparators
    raise ValueError(f"pivot rule must be 'uniform' or 'stream', got {rule!r}")


def topk_select(
    scores: np.ndarray,
    k: int,
    *,
    comparators: int = 16,
    pivot: PivotRule = "uniform",
    seed: int | np.random.Generator = 0,
) -> TopKResult:
    """Run the engine on `scores`: which k it keeps, and in how many cycles. Ties at the threshold are
    kept first-come, as TopK.scala's prefix sum does. k >= n bypasses the engine (0 cycles)."""
    values = np.asarray(scores, dtype=float).ravel()
    n = values.size
    if k < 1:
        raise ValueError(f"top-k needs k >= 1, got {k}")
    if k >= n:
        return TopKResult(np.arange(n), 0, 0, 0)
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    candidates, target = values, k - 1  # target: rank from the top of the k-th largest among candidates
    rounds = select = 0
    while True:
        rounds += 1
        select += -(-candidates.size // comparators) + ROUND_OVERHEAD
        threshold = candidates[_pivot_position(candidates.size, comparators, pivot, rng)]
        above = candidates[candidates > threshold]
        ties = int(np.count_nonzero(candidates == threshold))
        if above.size <= target < above.size + ties:
            break
        if target < above.size:
            candidates = above
        else:
            target -= above.size + ties
            candidates = candidates[candidates < threshold]
    greater, equal = values > threshold, values == threshold
    keep = greater | (equal & (np.cumsum(equal) <= k - np.count_nonzero(greater)))
    return TopKResult(np.flatnonzero(keep), rounds, select, int(compaction_cycles(n, comparators)))


def topk_cycles(
    n: int,
    k: int,
    seed: int = 0,
    comparators: int = 16,
    *,
    pivot: PivotRule = "uniform",
    scores: np.ndarray | None = None,
) -> int:
    """Cycles to keep the top k of n: selection + compaction, on `scores` or on n uniform random scores
    drawn from `seed` (one draw; `expected_topk` gives the mean)."""
    rng = np.random.default_rng(seed)
    values = rng.random(n) if scores is None else np.asarray(scores, dtype=float)
    if values.size != n:
        raise ValueError(f"{values.size} scores given for n={n}")
    return topk_select(values, k, comparators=comparators, pivot=pivot, seed=rng).cycles


@dataclass(frozen=True)
class ExpectedTopK:
    """Means over the uniform pivot on distinct scores (also the "stream" rule's on random scores)."""

    select_cycles: np.ndarray
    compact_cycles: np.ndarray
    visits: np.ndarray  # candidates passing a comparator, selection and compaction together (for energy)

    @property
    def cycles(self) -> np.ndarray:
        return self.select_cycles + self.compact_cycles


def expected_topk(n: int | np.ndarray, k: int | np.ndarray, comparators: int = 16) -> ExpectedTopK:
    """Exact mean cost of keeping the top k of n, element-wise over arrays; 0 where k >= n (bypass).

    With m candidates and the k-th largest at rank t (0-based from the top), a pivot of rank r is equally
    likely for r = 0..m-1, so E(m, t) = c(m) + (1/m) [sum_{r>t} E(r, t) + sum_{r<t} E(m-1-r, t-1-r)],
    c(m) = ceil(m / comparators) + 3. The first sum runs down a column of E and the second down a
    diagonal, so keeping running column and diagonal sums fills row m in O(m): O(n^2) time and O(n)
    memory for every target of every size up to n. The same recurrence with c(m) = m counts visits.
    """
    n_arr, k_arr = np.broadcast_arrays(np.asarray(n, dtype=np.int64), np.asarray(k, dtype=np.int64))
    if np.any(k_arr < 1):
        raise ValueError("top-k needs k >= 1")
    active = k_arr < n_arr
    select = np.zeros(n_arr.shape)
    visits = np.zeros(n_arr.shape)
    if active.any():
        wanted = set(np.unique(n_arr[active]).tolist())
        largest = max(wanted)
        column = np.zeros((2, largest))
        diagonal = np.zeros((2, largest + 2))
        rows: dict[int, np.ndarray] = {}
        for m in range(1, largest + 1):
            diag = np.arange(m, 0, -1)  # m - t for t = 0..m-1
            round_cost = np.array([[math.ceil(m / comparators) + ROUND_OVERHEAD], [m]])
            row = round_cost + (column[:, :m] + diagonal[:, diag]) / m
            column[:, :m] += row
            diagonal[:, diag] += row
            if m in wanted:
                rows[m] = row
        for size, row in rows.items():
            here = active & (n_arr == size)
            select[here], visits[here] = row[:, k_arr[here] - 1]
    compact = np.where(active, compaction_cycles(n_arr, comparators), 0)
    return ExpectedTopK(select, compact.astype(float), visits + np.where(active, n_arr, 0))
