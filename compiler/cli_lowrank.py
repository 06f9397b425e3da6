"""`--factorize lowrank` for `pcc compile` and `--nuclear-norm` for `pcc finetune`: the flags.

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

from pcc.compiler.options import FACTORIZATIONS, RANK_ALLOCATORS

__all__ = ["add_compile_arguments", "add_finetune_arguments"]


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
