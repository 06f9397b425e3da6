"""`--factorize lowrank` for `pcc compile` and `--nuclear-norm` for `pcc finetune`: the flags and the passes.

    pcc compile MODEL --sparsity S --factorize lowrank [--allocator uniform|energy|dp] [--budget params|macs|latency]
                [--calib FILE]
    pcc finetune MODEL --data FILE --nuclear-norm LAMBDA ...

With `--factorize lowrank`, every Conv (groups 1), Gemm and MatMul weight becomes a product of two thin
ones by truncated SVD (`passes/transforms/factorize_lowrank.py`) instead of losing channels, and
`--sparsity` is the fraction of the factorisable layers' `--budget` cost removed; `--allocator` chooses
the ranks (`passes/allocation/ranks.py`). `--nuclear-norm λ` adds TRP's regulariser λ·Σ‖W‖_* over the
same weights to the fine-tuning loss, which pushes their spectra down so that a later factorisation
loses less.

Only light imports here: `pcc --help` builds its parser from this module.
"""

from __future__ import annotations

import argparse

from pcc.compiler.options import FACTORIZATIONS, RANK_ALLOCATORS, CompileOptions

__all__ = ["add_compile_arguments", "add_finetune_arguments", "factorize_passes"]


def add_compile_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--factorize", choices=FACTORIZATIONS, metavar="lowrank",
        help="instead of removing channels, replace each Conv/Gemm/MatMul weight by two thin factors (truncated SVD; "
        "a k x k Conv becomes a k x k Conv to r channels and a 1 x 1 Conv); --sparsity is then the fraction of these "
        f"layers' --budget cost removed and --allocator ({'|'.join(RANK_ALLOCATORS)}) chooses the ranks",
    )


def add_finetune_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--nuclear-norm", type=float, default=0.0, metavar="LAMBDA",
        help="add LAMBDA x the sum of the nuclear norms of the Conv/Gemm/MatMul weights (TRP's regulariser: lower "
        "rank, so a later --factorize lowrank loses less) to the loss (default: 0, off)",
    )


def factorize_passes(options: CompileOptions) -> list:
    """With `options.factorize`: measure what the allocator needs, choose the ranks, factorise (else nothing).

    Goes after the (empty) group passes and before the repairs: BatchNorm re-estimation then sees the
    factorised layers' outputs.
    """
    if options.factorize is None:
        return []
    from pcc.passes.allocation.ranks import AllocateRanks
    from pcc.passes.analysis.rank_sensitivity import MeasureRankLatency, MeasureRankSensitivity
    from pcc.passes.transforms.factorize_lowrank import FactorizeLowRank

    passes: list = []
    if options.budget == "latency":
        passes.append(MeasureRankLatency(repeats=options.latency_repeats, batch=options.latency_batch))
    if options.allocator == "dp":
        passes.append(MeasureRankSensitivity(calibration=options.calibration))
    allocate = AllocateRanks(options.sparsity, options.budget, options.allocator, calibration=options.calibration)
    return [*passes, allocate, FactorizeLowRank()]
