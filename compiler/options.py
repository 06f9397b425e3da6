"""Compile options: one typed object for everything `pcc compile` can be asked, and the names it offers.

The command line and the Python API used to pass ~20 keywords one by one into one growing function;
now both fill a `CompileOptions`, which checks itself once, and each kind of pruning contributes its
own passes from it (`compiler/pipeline.py`). The choice tuples here are the contract of the command
line (shared/CLI.md); the passes that implement each name import it from here, so there is one list.

This module imports nothing heavy (no onnx, no torch): `pcc --help` and argument errors build the
parser from it and answer at once.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pcc.compiler.errors import InvalidRequestError

if TYPE_CHECKING:  # only for annotations: importing calibration pulls in onnx
    from pcc.compiler.calibration import CalibrationData

__all__ = [
    "ALLOCATOR_NAMES",
    "BUDGETS",
    "CRITERIA",
    "DATA_CRITERIA",
    "FACTORIZATIONS",
    "FINETUNE_PARAMS",
    "GROUP_KINDS",
    "HEAD_SHARE",
    "PRUNABLE_KINDS",
    "RANK_ALLOCATORS",
    "RECONSTRUCT_MODES",
    "REDUCTIONS",
    "SCHEDULES",
    "SPARSIFY_ALLOCATORS",
    "SPARSIFY_CRITERIA",
    "SPATTEN_CONFIG_NAMES",
    "TARGET_NAMES",
    "CompileOptions",
    "check_sparsity",
]

TARGET_NAMES = ("onnx", "spatten", "tvm")
# removed as dependency groups by the allocators and PruneChannels. "width" is a width a LayerNorm normalises
# (a transformer's hidden size, a ConvNeXt stage's): removing any of it changes the statistics of the rest, and
# FLAP, LLM-Pruner and pcc's Llama groups keep it, so `channels` (FFN units, conv channels) leaves it whole
GROUP_KINDS = ("channels", "heads", "width")
PRUNABLE_KINDS = (*GROUP_KINDS, "blocks", "tokens")  # blocks and tokens have their own passes
CRITERIA = ("l1", "l2", "bn", "lamp", "taylor", "hessian", "activation", "flap", "random", "wanda", "sparsegpt")
DATA_CRITERIA = ("taylor", "hessian", "activation", "flap")  # computed on calibration data
REDUCTIONS = ("mean", "sum", "max")
# the allocation passes, and `metanet` (the metanetwork's rewrite, then a global ranking of its norms)
ALLOCATOR_NAMES = ("uniform", "global", "lamp", "dp", "metanet")
SPARSIFY_ALLOCATORS = ("uniform", "global", "lamp")  # how --sparsify splits its zeros over layers
# which weights --sparsify zeroes: magnitude, or Wanda's |W|·‖X‖ / SparseGPT's OBS update on --calib (LLMs)
SPARSIFY_CRITERIA = ("l1", "l2", "wanda", "sparsegpt")
# --factorize: weights become products of thin ones (truncated SVD); the allocators that choose their ranks
FACTORIZATIONS = ("lowrank",)
RANK_ALLOCATORS = ("uniform", "energy", "dp")
BUDGETS = ("params", "macs", "latency")
# repair after removal: none, FLAP's bias compensation, or layer-wise least squares (ThiNet / He et al.)
RECONSTRUCT_MODES = ("none", "bias", "ls")
SPATTEN_CONFIG_NAMES = ("eighth", "full")
# pcc finetune: what is trained (every weight; PERP's biases and norms; low-rank adapters merged on write)
FINETUNE_PARAMS = ("all", "bn-bias", "lora")
# pcc finetune: when weights are zeroed (before training; Zhu & Gupta's gradual ramp; iterative magnitude pruning)
SCHEDULES = ("oneshot", "gmp", "imp")
HEAD_SHARE = 0.25  # --target spatten: head sparsity = HEAD_SHARE x the requested token x head sparsity


def check_sparsity(sparsity: float) -> None:
    if not (0.0 <= sparsity < 1.0) or math.isnan(sparsity):
        raise InvalidRequestError(f"--sparsity must be in [0, 1), got {sparsity}")


def _choice(flag: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise InvalidRequestError(f"unknown {flag.lstrip('-')} {value!r}; choose from {', '.join(choices)}")


@dataclass(frozen=True)
class CompileOptions:
    """What to remove and how, and the data and machine settings the passes measure with.

    `sparsity` is the fraction of the `budget` cost removed from the `prune` kinds (or, with `sparsify`,
    the fraction of the layers' weights made zero; with `factorize`, of the factorisable layers' cost,
    their ranks chosen by `allocator`). `calibration` feeds data-driven scores, the sensitivity sweep,
    BatchNorm re-estimation and reconstruction; `reconstruct` re-fits the layers after the removed units
    on it. The rest mirrors the command line's flags of the same names.
    """

    sparsity: float
    prune: tuple[str, ...] = ("channels",)
    sparsify: str | None = None
    importance: str = "l2"
    reduction: str = "mean"
    allocator: str = "uniform"
    budget: str = "params"
    metanet: bool = False
    round_to: int = 1
    seed: int = 0
    reconstruct: str = "none"
    recalibrate_bn: bool = False
    calibration: CalibrationData | None = field(default=None, repr=False)
    input_shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    workers: int | None = None
    ray_address: str | None = None
    sensitivity_cache: Path | None = None
    latency_batch: int = 1
    latency_length: int = 128
    latency_repeats: int = 20
    compare_allocators: bool = False
    factorize: str | None = None
    language_model: bool = False  # a causal LM (its LM head is kept dense by --sparsify)
    progress: bool = field(default=False, repr=False)

    def __post_init__(self) -> None:
        check_sparsity(self.sparsity)
        if self.factorize is None:
            _choice("--allocator", self.allocator, ALLOCATOR_NAMES)
        _choice("--importance", self.importance, CRITERIA)
        _choice("--reduction", self.reduction, REDUCTIONS)
        _choice("--budget", self.budget, BUDGETS)
        _choice("--reconstruct", self.reconstruct, RECONSTRUCT_MODES)
        for flag, value in (("--round-to", self.round_to), ("--workers", self.workers),
                            ("--latency-batch", self.latency_batch), ("--latency-length", self.latency_length),
                            ("--repeats", self.latency_repeats)):
            if value is not None and value < 1:
                raise InvalidRequestError(f"{flag} must be at least 1, got {value}")
        unknown = sorted(set(self.prune) - set(PRUNABLE_KINDS))
        if unknown or not self.prune:
            raise InvalidRequestError(
                f"cannot prune {', '.join(unknown) or 'nothing'}; choose from {', '.join(PRUNABLE_KINDS)}"
            )
        real_data = self.calibration is not None and not self.calibration.synthetic
        if self.recalibrate_bn and not real_data:
            raise InvalidRequestError("BatchNorm recalibration needs real calibration data (--calib)")
        if self.reconstruct != "none" and not real_data:
            raise InvalidRequestError(f"--reconstruct {self.reconstruct} needs real calibration data (--calib)")
        if self.importance in ("wanda", "sparsegpt") and self.sparsify is None:
            raise InvalidRequestError(f"--importance {self.importance} chooses weights to zero: use it with "
                                      "--sparsify unstructured|nm:N:M")
        if self.importance == "flap" and self.allocator in ("lamp", "metanet"):
            raise InvalidRequestError(f"--importance flap scores are standardised (mean zero per layer); --allocator "
                                      f"{self.allocator} misreads them: use global (FLAP's ranking), uniform or dp")
        if self.sparsify is not None:
            self._check_sparsify()
        if self.factorize is not None:
            self._check_factorize()

    def _check_sparsify(self) -> None:
        if self.allocator not in SPARSIFY_ALLOCATORS:
            raise InvalidRequestError(
                f"--allocator {self.allocator} does not apply to --sparsify; choose from {', '.join(SPARSIFY_ALLOCATORS)}"
            )
        _choice("--importance", self.importance, SPARSIFY_CRITERIA)
        if self.prune != ("channels",):
            raise InvalidRequestError("--sparsify zeroes weights instead of removing units; it does not combine with --prune")
        if self.budget != "params":
            raise InvalidRequestError("--sparsify counts zeroed weights: --budget macs|latency does not apply")
        if self.metanet:
            raise InvalidRequestError("--metanet prepares networks for removing units; it does not combine with --sparsify")

    def _check_factorize(self) -> None:
        _choice("--factorize", self.factorize, FACTORIZATIONS)
        if self.allocator not in RANK_ALLOCATORS:
            raise InvalidRequestError(f"--allocator {self.allocator} does not choose ranks; with --factorize lowrank "
                                      f"use {', '.join(RANK_ALLOCATORS)}")
        if self.sparsify is not None or self.prune != ("channels",) or self.metanet:
            raise InvalidRequestError("--factorize lowrank replaces weights by thin products; it does not combine with "
                                      "--sparsify, --prune or --metanet")
        if self.reconstruct != "none":
            raise InvalidRequestError("--reconstruct re-fits pruned layers; it does not apply to --factorize lowrank")

    @property
    def group_kinds(self) -> tuple[str, ...]:
        """The dependency-group kinds the allocators may shrink (none when weights are sparsified instead)."""
        removes_units = self.sparsify is None and self.factorize is None
        return tuple(k for k in self.prune if k in GROUP_KINDS) if removes_units else ()

    @property
    def uses_metanet(self) -> bool:
        # at sparsity 0 the output must be the input model, so the metanetwork's rewrite is skipped
        return (self.metanet or self.allocator == "metanet") and self.sparsity > 0
