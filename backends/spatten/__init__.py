"""SpAtten (HPCA 2021) as a target: the program format its RTL executes and a cycle/energy model of it.

Self-contained (numpy only): `hardware` holds the machine's parameters and energy constants, `program` the
per-head requests in the RTL testbench's CSV format, `topk` the top-k engine's cycle model, `simulator`
the cycle-approximate simulator, `schedule` programs built from a pruning schedule and dense baselines.

    from pcc.backends.spatten import FULL, dense_program, program_from_schedule, simulate
    pruned = program_from_schedule("bert", 12, 12, 64, 384, token_keep, head_keep, msb_bits=8, tau=0.1,
                                   requant_fraction=0.06)
    speedup = simulate(dense_program(pruned), FULL).cycles / simulate(pruned, FULL).cycles
"""

from pcc.backends.spatten.hardware import EIGHTH, ENERGY_40NM, FULL, EnergyModel, SpAttenConfig
from pcc.backends.spatten.program import CSV_COLUMNS, HeadRequest, Mode, Program
from pcc.backends.spatten.schedule import dense_program, program_from_schedule
from pcc.backends.spatten.simulator import CYCLE_COMPONENTS, ENERGY_COMPONENTS, PartStats, SimulationResult, simulate
from pcc.backends.spatten.topk import ExpectedTopK, PivotRule, TopKResult, expected_topk, topk_cycles, topk_select

__all__ = [
    "CSV_COLUMNS", "CYCLE_COMPONENTS", "EIGHTH", "ENERGY_40NM", "ENERGY_COMPONENTS", "FULL", "EnergyModel",
    "ExpectedTopK", "HeadRequest", "Mode", "PartStats", "PivotRule", "Program", "SimulationResult",
    "SpAttenConfig", "TopKResult", "dense_program", "expected_topk", "program_from_schedule", "simulate",
    "topk_cycles", "topk_select",
]
