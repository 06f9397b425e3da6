"""Cycle-approximate model of SpAtten running a `Program`: cycles, DRAM bytes and energy, with breakdowns.

SpAtten runs attention only (the host runs the QKV projections and the FFN), so this models attention only,
as the paper does.

Per request (Q query rows, K keys and V values fetched, head dimension D; bit widths from the request,
-1 meaning the machine's full word):
- DRAM bytes = Q*D*query_bits/8 (re-streamed for every SRAM tile) + K*D*msb_bits/8 + V*D*value_bits/8
  + p_lsb * K*D*lsb_bits/8. A fraction f = `requant_fraction` of the query rows needs the key LSBs;
  the LSBs are fetched once per request and then stay in the 12-bit key SRAM for every later row, so
  p_lsb = 1 - (1 - f)^Q, the chance that some row needs them: exactly f for a one-query request (GPT-2
  generation, the RTL's request), nearly 1 for a BERT head with hundreds of rows.
- Unit work, in cycles: Q x K needs Q * ceil(K*D / multipliers), softmax Q * ceil(K / lanes), prob x V
  Q * ceil(V*D / multipliers); the f*Q re-quantized rows redo Q x K and softmax; local value pruning
  (V < K) runs the top-k engine once per query row (`expected_topk`: the mean of the RTL's pivot rule,
  selection plus the order-keeping compaction). DRAM work is bytes / (channels x 32 B).
- Keys (or values) beyond one half of the double-buffered SRAM (1024 rows at D=64) are processed in tiles;
  each extra tile costs a pipeline drain (a query row's softmax must see all its keys; we assume its
  partial results stay on chip, so tiles add no DRAM traffic beyond re-streaming the queries).

Timing rule. Requests of one (iteration, layer) are independent heads: they stream through the units
back to back, and the fetcher fills one half of each SRAM while the units read the other, so all units
work concurrently: group cycles = max(unit work summed over the group) + one pipeline fill/drain
(`SpAttenConfig.pipeline_depth` + the softmax row FIFO) + the cascade token top-k, which needs every
head's scores and so runs after them. Groups run one after another (the next layer's queries come from
the host). `SpAttenConfig.overlap_fetch=False` adds the DRAM work to the compute instead, which is the
RTL's C++ model (bert.cpp: cycles = DRAM + fill + drain + top-k per layer). The model assumes peak HBM
bandwidth (the RTL simulates DRAM with Ramulator) and enough buffering to keep every unit busy.

The cycle breakdown attributes each group's streaming phase to its bottleneck unit, split into that unit's
own work and the part that re-quantization added to it (`requant`), plus fill/drain and top-k, so it sums
to the total; `unit_busy_cycles` gives every unit's work, which overlaps and does not sum.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from pcc.backends.spatten.hardware import ENERGY_40NM, FULL, EnergyModel, SpAttenConfig
from pcc.backends.spatten.program import Program
from pcc.backends.spatten.topk import expected_topk

__all__ = ["CYCLE_COMPONENTS", "ENERGY_COMPONENTS", "PartStats", "SimulationResult", "simulate"]

UNITS = ("dram", "qk", "softmax", "pv", "topk")  # work concurrently within a group
CYCLE_COMPONENTS = (*UNITS, "requant", "fill_drain")
ENERGY_COMPONENTS = ("dram", "compute", "sram", "topk")


@dataclass(frozen=True)
class PartStats:
    """Totals for one layer (summed over iterations) or one iteration (summed over layers)."""

    index: int
    cycles: float
    dram_bytes: float
    energy_j: float


@dataclass(frozen=True)
class SimulationResult:
    config: str
    mode: str
    requests: int
    cycles: float
    seconds: float
    dram_bytes: float
    energy_j: float
    keys_fetched: int  # key rows fetched, summed over requests
    values_fetched: int
    cycle_breakdown: dict[str, float]  # critical path per component; sums to `cycles`
    unit_busy_cycles: dict[str, float]  # work of each unit (top-k: value and token); overlaps, does not sum
    dram_breakdown: dict[str, float]  # bytes: query, key_msb, key_lsb, value; sums to `dram_bytes`
    energy_breakdown: dict[str, float]  # joules: dram, compute, sram, topk; sums to `energy_j`
    per_layer: list[PartStats]
    per_iteration: list[PartStats]

    @property
    def average_power_w(self) -> float:
        return self.energy_j / self.seconds

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "average_power_w": self.average_power_w}


def simulate(program: Program, config: SpAttenConfig = FULL, energy: EnergyModel = ENERGY_40NM) -> SimulationResult:
    column = program.column
    queries = program.query_rows().astype(float)
    dim = column("embedding_length_D").astype(float)
    keys = column("key_fetch_num").astype(float)
    values = column("value_fetch_num").astype(float)

    def width(name: str, default: int) -> np.ndarray:
        bits = column(name)
        return np.where(bits > 0, bits, default).astype(float)

    key_bits = width("quant_key_bit", config.word_bits)
    value_bits = width("quant_value_bit", config.word_bits)
    query_bits = width("quant_query_bit", config.query_bits)
    lsb_bits = width("auto_requant_incre", config.lsb_bits)
    requant_rows = column("requant_fraction") * queries
    lsb_share = 1 - (1 - column("requant_fraction")) ** queries

    key_tile = config.tile_rows(dim, config.key_sram_bytes)
    value_tile = config.tile_rows(dim, config.value_sram_bytes)
    tiles = np.maximum(np.ceil(keys / key_tile), np.ceil(values / value_tile))

    dram = {
        "query": queries * dim * query_bits / 8 * tiles,
        "key_msb": keys * dim * key_bits / 8,
        "key_lsb": lsb_share * keys * dim * lsb_bits / 8,
        "value": values * dim * value_bits / 8,
    }
    request_bytes = sum(dram.values())
    bandwidth = config.dram_bytes_per_cycle

    qk_row = np.ceil(keys * dim / config.qk_multipliers)
    softmax_row = np.ceil(keys / config.softmax_lanes)
    pv_row = np.ceil(values * dim / config.pv_multipliers)

    # One DP for both top-k uses: value pruning (keys -> values, per query row) and the token top-k, which
    # ranks this request's keys when it keeps fewer of them (the next layer's tokens) and else the whole
    # context (the next GPT-2 step's tokens, as the RTL's trace does after the last layer).
    value_pruned = values < keys
    kept_tokens = column("topk")
    candidates = np.where(kept_tokens < keys, keys, column("sentence_length_L"))
    token_topk = column("if_topk") & (kept_tokens < candidates)
    n_requests = len(program.requests)
    topk = expected_topk(
        np.concatenate([np.where(value_pruned, keys, 1), np.where(token_topk, candidates, 1)]).astype(np.int64),
        np.concatenate([values, np.where(token_topk, kept_tokens, 1)]).astype(np.int64),
        config.topk_comparators,
    )
    value_topk_cycles, token_topk_cycles = np.split(topk.cycles, [n_requests])
    value_visits, token_visits = np.split(topk.visits, [n_requests])

    work = np.stack([
        request_bytes / bandwidth,
        (queries + requant_rows) * qk_row,
        (queries + requant_rows) * softmax_row,
        queries * pv_row,
        queries * value_topk_cycles,
    ])
    requant_work = np.stack([
        dram["key_lsb"] / bandwidth,
        requant_rows * qk_row,
        requant_rows * softmax_row,
        np.zeros(n_requests),
        np.zeros(n_requests),
    ])
    drain = config.pipeline_depth + np.ceil(np.minimum(keys, key_tile) / config.softmax_lanes)

    # Group the requests by (iteration, layer).
    iteration, layer = column("iteration_id"), column("layer_id")
    pairs, group = np.unique(np.stack([iteration, layer], axis=1), axis=0, return_inverse=True)
    group = group.ravel()
    n_groups = len(pairs)

    def per_group(x: np.ndarray) -> np.ndarray:
        return np.bincount(group, weights=x, minlength=n_groups)

    group_work = np.stack([per_group(row) for row in work])
    group_requant = np.stack([per_group(row) for row in requant_work])
    group_drain = np.zeros(n_groups)
    np.maximum.at(group_drain, group, drain)
    fill_drain = group_drain + per_group((tiles - 1) * drain)
    serial_topk = per_group(np.where(token_topk, token_topk_cycles, 0.0))

    breakdown = dict.fromkeys(CYCLE_COMPONENTS, 0.0)
    group_cycles = fill_drain + serial_topk
    breakdown["fill_drain"] = float(fill_drain.sum())
    breakdown["topk"] = float(serial_topk.sum())
    # Overlapped: one phase where every unit runs at once. Not overlapped (bert.cpp): DRAM, then compute.
    phases = [list(range(len(UNITS)))] if config.overlap_fetch else [[0], list(range(1, len(UNITS)))]
    every_group = np.arange(n_groups)
    for units in phases:
        choice = group_work[units].argmax(axis=0)
        longest = group_work[units][choice, every_group]
        added = group_requant[units][choice, every_group]
        group_cycles = group_cycles + longest
        breakdown["requant"] += float(added.sum())
        for position, unit in enumerate(units):
            breakdown[UNITS[unit]] += float((longest - added)[choice == position].sum())

    # Energy, per request, in picojoules.
    word = config.word_bits
    qk_rows_done = queries + requant_rows
    energy_pj = {
        "dram": request_bytes * 8 * energy.dram_bit_pj,
        "compute": qk_rows_done * keys * dim * energy.mac_pj(word, query_bits)
        + queries * values * dim * energy.mac_pj(word, word)
        + qk_rows_done * keys * energy.softmax_element_pj()
        + column("if_accumulate_importance") * queries * keys * energy.add_pj(energy.accumulator_bits),
        "sram": energy.sram_pj((keys + values) * dim * word + dram["key_lsb"] * 8)  # writes
        + energy.sram_pj((qk_rows_done * keys + queries * values) * dim * word),  # reads
        # every visit: one compare, one FIFO read, one FIFO write
        "topk": (queries * value_visits + np.where(token_topk, token_visits, 0.0))
        * (energy.add_pj(word) + energy.sram_pj(2 * word)),
    }
    request_energy = sum(energy_pj.values()) * 1e-12

    def parts(index_of_group: np.ndarray, index_of_request: np.ndarray) -> list[PartStats]:
        labels = np.unique(index_of_group)
        position_of_group = np.searchsorted(labels, index_of_group)
        position_of_request = np.searchsorted(labels, index_of_request)
        cycles = np.bincount(position_of_group, weights=group_cycles, minlength=len(labels))
        data = np.bincount(position_of_request, weights=request_bytes, minlength=len(labels))
        joules = np.bincount(position_of_request, weights=request_energy, minlength=len(labels))
        return [PartStats(int(i), float(c), float(b), float(e)) for i, c, b, e in zip(labels, cycles, data, joules)]

    total_cycles = float(group_cycles.sum())
    return SimulationResult(
        config=config.name,
        mode=program.mode,
        requests=n_requests,
        cycles=total_cycles,
        seconds=total_cycles / config.clock_hz,
        dram_bytes=float(request_bytes.sum()),
        energy_j=float(request_energy.sum()),
        keys_fetched=int(keys.sum()),
        values_fetched=int(values.sum()),
        cycle_breakdown=breakdown,
        unit_busy_cycles={unit: float(row.sum()) for unit, row in zip(UNITS, work)}
        | {"topk": float(work[-1].sum() + serial_topk.sum())},
        dram_breakdown={name: float(b.sum()) for name, b in dram.items()},
        energy_breakdown={name: float(pj.sum()) * 1e-12 for name, pj in energy_pj.items()},
        per_layer=parts(pairs[:, 1], layer),
        per_iteration=parts(pairs[:, 0], iteration),
    )
