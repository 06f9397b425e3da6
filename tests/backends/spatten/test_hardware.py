"""SpAtten's design points and energy constants."""

from __future__ import annotations

import pytest

from pcc.backends.spatten import EIGHTH, ENERGY_40NM, FULL, SpAttenConfig


def test_full_and_eighth_match_the_paper():
    assert FULL.dram_bytes_per_cycle == 512 and EIGHTH.dram_bytes_per_cycle == 64  # 512 GB/s and 64 GB/s at 1 GHz
    assert FULL.softmax_lanes == 8 and EIGHTH.softmax_lanes == 1
    assert (EIGHTH.qk_multipliers, EIGHTH.pv_multipliers) == (64, 64)
    assert FULL.pipeline_depth == 11 + 87 + 1 + 1 + 3
    assert FULL.tile_rows(64, FULL.key_sram_bytes) == 1024  # one half of 2 x 1024 x 64 x 12 bit
    assert FULL.tile_rows(128, FULL.key_sram_bytes) == 512


def test_config_rejects_nonsense():
    with pytest.raises(ValueError, match="hbm_channels"):
        SpAttenConfig(hbm_channels=0)


def test_energy_constants_interpolate_horowitz():
    scale = 40 / 45
    assert ENERGY_40NM.mult_pj(8, 8) == pytest.approx(0.2 * scale)
    assert ENERGY_40NM.mult_pj(32, 32) == pytest.approx(3.1 * scale, rel=0.05)  # the table's 32-bit multiply
    assert ENERGY_40NM.add_pj(32) == pytest.approx(0.1 * scale)
    assert ENERGY_40NM.add_pj(16) == pytest.approx((0.03 + 0.07 / 3) * scale)
    assert ENERGY_40NM.sram_pj(64) == pytest.approx(10 * scale)
    assert ENERGY_40NM.dram_bit_pj == 3.9
