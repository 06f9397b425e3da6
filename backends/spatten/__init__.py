"""SpAtten (HPCA 2021) as a target: the program format its RTL executes, a cycle/energy model of it, and the
lowering of a cascade-pruned transformer to it.

The hardware model is self-contained (numpy only): `hardware` holds the machine's parameters and energy
constants, `program` the per-head requests in the RTL testbench's CSV format, `topk` the top-k engine's
cycle model, `simulator` the cycle-approximate simulator, `schedule` programs built from a pruning schedule
and dense baselines. On the IR side, `pipeline` splits `--sparsity` between cascade token and head pruning,
`emulation` writes SpAtten's progressive quantization into the graph, `lowering` turns the pruning reports
into a program, and `target` (`SpAttenTarget`) writes the folder `--target spatten` produces.

    from pcc.backends.spatten import FULL, dense_program, program_from_schedule, simulate
    pruned = program_from_schedule("bert", 12, 12, 64, 384, token_keep, head_keep, msb_bits=8, tau=0.1,
                                   requant_fraction=0.06)
    speedup = simulate(dense_program(pruned), FULL).cycles / simulate(pruned, FULL).cycles
"""

from pcc.backends.spatten.emulation import REQUANT_COLUMNS, REQUANT_OUTPUT, EmulateProgressiveQuantization
from pcc.backends.spatten.hardware import EIGHTH, ENERGY_40NM, FULL, EnergyModel, SpAttenConfig
from pcc.backends.spatten.lowering import attention_work_removed, lower_to_program
from pcc.backends.spatten.pipeline import (
    HEAD_SHARE, AttentionSparsitySplit, CascadeTokensAndHeads, spatten_pipeline, split_attention_sparsity,
)
from pcc.backends.spatten.program import CSV_COLUMNS, HeadRequest, Mode, Program
from pcc.backends.spatten.report import SpAttenReport
from pcc.backends.spatten.schedule import dense_program, program_from_schedule
from pcc.backends.spatten.simulator import CYCLE_COMPONENTS, ENERGY_COMPONENTS, PartStats, SimulationResult, simulate
from pcc.backends.spatten.target import CONFIGS, Measurement, SpAttenTarget, measure
from pcc.backends.spatten.topk import ExpectedTopK, PivotRule, TopKResult, expected_topk, topk_cycles, topk_select

__all__ = [
    "CONFIGS", "CSV_COLUMNS", "CYCLE_COMPONENTS", "EIGHTH", "ENERGY_40NM", "ENERGY_COMPONENTS", "FULL", "HEAD_SHARE",
    "REQUANT_COLUMNS", "REQUANT_OUTPUT", "AttentionSparsitySplit", "CascadeTokensAndHeads",
    "EmulateProgressiveQuantization", "EnergyModel", "ExpectedTopK", "HeadRequest", "Measurement", "Mode",
    "PartStats", "PivotRule", "Program", "SimulationResult", "SpAttenConfig", "SpAttenReport", "SpAttenTarget",
    "TopKResult", "attention_work_removed", "dense_program", "expected_topk", "lower_to_program", "measure",
    "program_from_schedule", "simulate", "spatten_pipeline", "split_attention_sparsity", "topk_cycles", "topk_select",
]
