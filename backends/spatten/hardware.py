"""SpAtten's hardware parameters and the energy constants the simulator charges.

Everything the cycle and energy model knows about the machine lives here, in two frozen dataclasses, so a
design point (SpAtten 1/8, more top-k comparators, another DRAM) is one `dataclasses.replace` away and a
result can always say which machine it was measured on.

Sources. SpAtten (Wang, Zhang, Han, HPCA 2021) and its public RTL (github.com/mit-han-lab/spatten):
`SpAtten.scala` (SpAttenConfig: 12-bit words, 512 multipliers, 16 HBM channels, softmax units =
multipliers / 64), `simulator/src/bert.cpp` (the C++ model's pipeline latencies, copied below), the GPT-2
traces in `hardware/workloads/` (16-bit queries, 4 LSB bits fetched on re-quantization). The key/value
SRAM size (196 KB each: 2 x 1024 rows x 64 dims x 12 bit, double-buffered) is from a review of the paper.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["EIGHTH", "ENERGY_40NM", "FULL", "EnergyModel", "SpAttenConfig"]


@dataclass(frozen=True)
class SpAttenConfig:
    """One SpAtten design point. Cycles are clock cycles of `clock_hz`."""

    name: str = "SpAtten"
    clock_hz: float = 1e9
    hbm_channels: int = 16
    channel_bytes_per_cycle: int = 32  # one 256-bit HBM2 transfer per channel per cycle: 512 GB/s at 16 x 1 GHz
    qk_multipliers: int = 512  # Q x K module
    pv_multipliers: int = 512  # probability x V module
    topk_comparators: int = 16  # top-k engine: candidates compared with the pivot per cycle
    key_sram_bytes: int = 196_608  # 2 x 1024 x 64 x 12 bit
    value_sram_bytes: int = 196_608
    word_bits: int = 12  # fixed-point word of K and V on chip; a fetch of all bits is the unquantized baseline
    lsb_bits: int = 4  # bits added by one re-quantization fetch
    query_bits: int = 16
    # Pipeline latencies, from simDrainPipeline in the RTL's C++ model (bert.cpp).
    qk_latency: int = 1 + 1 + 9  # SRAM read, multiplier, reduction tree
    softmax_latency: int = 7 + 21 + 23 + 29 + 7  # dequantize, e^x (5th-order Taylor), accumulate, divide, quantize
    requant_latency: int = 1  # the decision compares the row's largest probability with tau
    topk_latency: int = 1  # pass-through when a request has no top-k
    pv_latency: int = 1 + 1 + 1  # SRAM read, multiplier, accumulator
    # The fetcher writes one half of each double-buffered SRAM while the units read the other, so memory
    # traffic overlaps compute (the brief's reading of the architecture). False reproduces bert.cpp, which
    # adds a layer's DRAM cycles to its compute cycles.
    overlap_fetch: bool = True

    def __post_init__(self) -> None:
        for field, value in asdict(self).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value <= 0:
                raise ValueError(f"SpAttenConfig.{field} must be positive, got {value}")

    @property
    def dram_bytes_per_cycle(self) -> int:
        return self.hbm_channels * self.channel_bytes_per_cycle

    @property
    def softmax_lanes(self) -> int:
        """Keys whose probability the softmax finishes per cycle (RTL: numSoftMaxUnit = multipliers / 64)."""
        return max(1, self.qk_multipliers // 64)

    @property
    def pipeline_depth(self) -> int:
        """Cycles from the first key entering Q x K to the first output leaving prob x V."""
        return self.qk_latency + self.softmax_latency + self.requant_latency + self.topk_latency + self.pv_latency

    def tile_rows(self, head_dim: int | np.ndarray, sram_bytes: int) -> int | np.ndarray:
        """Rows of `head_dim` words that one half of a double-buffered SRAM holds (1024 at D = 64)."""
        return np.maximum(1, (sram_bytes // 2) * 8 // (head_dim * self.word_bits))

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "dram_bytes_per_cycle": self.dram_bytes_per_cycle,
                "softmax_lanes": self.softmax_lanes, "pipeline_depth": self.pipeline_depth}


# The paper's design point: 512 + 512 multipliers, 16 HBM2 channels (512 GB/s).
FULL = SpAttenConfig()
# SpAtten 1/8, the configuration of the RTL's evaluation scripts: 64 multipliers per module, 2 channels
# (64 GB/s). The RTL keeps the same buffer capacity when it scales down, and so do we.
EIGHTH = SpAttenConfig(name="SpAtten 1/8", hbm_channels=2, qk_multipliers=64, pv_multipliers=64)


@dataclass(frozen=True)
class EnergyModel:
    """Dynamic energy per operation, in picojoules.

    Logic and SRAM: M. Horowitz, "Computing's energy problem (and what we can do about it)", ISSCC 2014,
    45 nm at 0.9 V: 8-bit integer multiply 0.2 pJ, 8-bit add 0.03 pJ, 32-bit add 0.1 pJ, 64-bit read of an
    8 KB SRAM 10 pJ. Assumptions on top of the table:
    - an a x b-bit array multiplier costs 0.2 pJ * a*b/64 (area ~ a*b); that formula gives 3.2 pJ at 32 x 32
      against the table's 3.1 pJ, so it interpolates the table rather than inventing a slope;
    - an adder's energy is linear in its width between the 8- and 32-bit entries;
    - SpAtten's K/V SRAMs are banked to feed 512 multipliers, so an access costs what a small (8 KB) array
      costs, per 64 bits moved; FIFOs of the top-k engine likewise;
    - 45 nm -> 40 nm (the paper's node): E ~ C V^2 with C ~ feature size and V unchanged, i.e. x 40/45 on
      logic and SRAM. First-order only.
    DRAM: HBM2 at ~3.9 pJ/bit (activation + on-die movement + I/O), the HBM2 figure of M. O'Connor et al.,
    "Fine-Grained DRAM: Energy-Efficient DRAM for Extreme Bandwidth Systems", MICRO 2017; off-chip, not
    scaled. The value is restated from memory of that paper, not re-read here.
    Not modelled: leakage, clocking, control and the host's projections/FFN. The paper's 8.30 W includes
    leakage and control, so this model's power is a lower bound of the chip's.
    """

    int_mult_8b_pj: float = 0.2
    int_add_8b_pj: float = 0.03
    int_add_32b_pj: float = 0.1
    sram_64b_pj: float = 10.0
    dram_bit_pj: float = 3.9
    process_scale: float = 40 / 45
    accumulator_bits: int = 32
    softmax_bits: int = 16  # fixed-point width inside the softmax unit

    def mult_pj(self, a_bits: float, b_bits: float) -> float:
        return self.int_mult_8b_pj * a_bits * b_bits / 64 * self.process_scale

    def add_pj(self, bits: float) -> float:
        slope = (self.int_add_32b_pj - self.int_add_8b_pj) / 24
        return (self.int_add_8b_pj + slope * (bits - 8)) * self.process_scale

    def sram_pj(self, bits: float) -> float:
        return self.sram_64b_pj * bits / 64 * self.process_scale

    def mac_pj(self, a_bits: float, b_bits: float) -> float:
        return self.mult_pj(a_bits, b_bits) + self.add_pj(self.accumulator_bits)

    def softmax_element_pj(self) -> float:
        """One probability: dequantize (1 multiply), e^x by 5th-order Taylor in Horner form (5 multiplies +
        5 adds), accumulate the row sum (1 wide add), scale by the row's reciprocal (1 multiply; the divider
        runs once per row) and quantize (1 multiply)."""
        b = self.softmax_bits
        return 8 * self.mult_pj(b, b) + 5 * self.add_pj(b) + self.add_pj(self.accumulator_bits)

    def to_dict(self) -> dict[str, float]:
        return {**asdict(self), "mult_12x16_pj": self.mult_pj(12, 16), "mac_12x16_pj": self.mac_pj(12, 16),
                "softmax_element_pj": self.softmax_element_pj(), "sram_64b_scaled_pj": self.sram_pj(64)}


ENERGY_40NM = EnergyModel()
