"""The pass manager: a pipeline is a plain, editable list of `onnx_ir` passes.

Users build one with `channel_pruning_pipeline(...)` or by hand, print it, reorder or extend it like a
list, and run it. Running times every pass and keeps every analysis result a pass produced (even ones
a later transform invalidated on the model), so groups, importance and the allocation can be
inspected after the fact.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TypeVar

import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from tqdm.auto import tqdm

from pcc.compiler.errors import InvalidRequestError, PccError
from pcc.compiler.calibration import CalibrationData
from pcc.passes.allocation import ALLOCATORS, BUDGETS, AllocateDP
from pcc.passes.allocation.compare import CompareAllocators
from pcc.passes.analysis.attention import FindAttentionBlocks
from pcc.passes.analysis.cost import MeasureCost
from pcc.passes.analysis.dependency_groups import BuildDependencyGroups
from pcc.passes.analysis.importance import CRITERIA, REDUCTIONS, ScoreImportance
from pcc.passes.analysis.latency import MeasureLatency
from pcc.passes.analysis.residual_blocks import FindResidualBlocks
from pcc.passes.analysis.sensitivity import MeasureSensitivity
from pcc.passes.analysis.shapes import InferMissingShapes
from pcc.passes.transforms.canonical_attention import CanonicalAttentionLayout
from pcc.passes.transforms.channel_shuffle import ChannelShuffleToGather
from pcc.passes.transforms.fold_constants import FoldConstants
from pcc.passes.transforms.recalibrate_batchnorm import RecalibrateBatchNorm
from pcc.passes.transforms.static_reshape_targets import StaticReshapeTargets
from pcc.passes.transforms.prune_blocks import PruneBlocks
from pcc.passes.transforms.prune_channels import PruneChannels
from pcc.passes.transforms.prune_tokens import PruneTokens
from pcc.passes.transforms.sparsify_weights import SPARSIFY_ALLOCATORS, SparsifyWeights

__all__ = [
    "ALLOCATOR_NAMES",
    "Pipeline",
    "PipelineResult",
    "PassTiming",
    "describe_pass",
    "preparation_passes",
    "analysis_pipeline",
    "channel_pruning_pipeline",
]

R = TypeVar("R")


def describe_pass(pass_: ir.passes.PassBase) -> str:
    """`Name(arg=value, ...)` for pcc's dataclass passes, `Name()` for others."""
    if dataclasses.is_dataclass(pass_):
        return repr(pass_)
    return f"{type(pass_).__name__}()"


@dataclasses.dataclass(frozen=True)
class PassTiming:
    name: str
    seconds: float
    modified: bool


@dataclasses.dataclass
class PipelineResult:
    model: ir.Model
    timings: list[PassTiming]
    results: dict[str, object]  # every analysis result produced, by its META_KEY

    def get(self, result_type: type[R]) -> R | None:
        """The last result of this type any pass produced, or None."""
        return self.results.get(result_type.META_KEY)  # type: ignore[attr-defined,return-value]

    def seconds(self, *pass_types: type) -> float:
        names = {t.__name__ for t in pass_types}
        return sum(t.seconds for t in self.timings if t.name.split("(")[0] in names)

    def timing_table(self) -> str:
        names = [t.name if len(t.name) <= 72 else t.name[:69] + "..." for t in self.timings]  # reprs can be long
        width = max((len(name) for name in names), default=10)
        lines = [f"  {name:<{width}}  {1000 * t.seconds:9.1f} ms" for name, t in zip(names, self.timings)]
        total = sum(t.seconds for t in self.timings)
        return "\n".join(lines + [f"  {'total':<{width}}  {1000 * total:9.1f} ms"])


class Pipeline:
    """An ordered list of passes; behaves like a list (`append`, `insert`, indexing, `del`...)."""

    def __init__(self, passes: Iterable[ir.passes.PassBase] = ()) -> None:
        self.passes: list[ir.passes.PassBase] = list(passes)

    def __len__(self) -> int:
        return len(self.passes)

    def __iter__(self) -> Iterator[ir.passes.PassBase]:
        return iter(self.passes)

    def __getitem__(self, index):
        return self.passes[index]

    def __setitem__(self, index, pass_) -> None:
        self.passes[index] = pass_

    def __delitem__(self, index) -> None:
        del self.passes[index]

    def append(self, pass_: ir.passes.PassBase) -> None:
        self.passes.append(pass_)

    def insert(self, index: int, pass_: ir.passes.PassBase) -> None:
        self.passes.insert(index, pass_)

    def index(self, pass_type: type) -> int:
        """Position of the first pass of this type."""
        for position, pass_ in enumerate(self.passes):
            if isinstance(pass_, pass_type):
                return position
        raise ValueError(f"no {pass_type.__name__} in the pipeline")

    def __repr__(self) -> str:
        body = "\n".join(f"  {i:2d}. {describe_pass(p)}" for i, p in enumerate(self.passes))
        return f"Pipeline(\n{body}\n)"

    def run(self, model: ir.Model, *, progress: bool = False) -> PipelineResult:
        """Run every pass in order on `model` (in place) and time each one."""
        timings: list[PassTiming] = []
        results: dict[str, object] = {}
        bar = tqdm(self.passes, desc="pcc", unit="pass", disable=not progress, leave=False)
        for pass_ in bar:
            name = describe_pass(pass_)
            bar.set_postfix_str(type(pass_).__name__)
            start = time.perf_counter()
            try:
                outcome = pass_(model)
            except ir.passes.PreconditionError as exc:
                # onnx_ir wraps errors raised in `requires`; a user-facing one must stay user-facing
                if isinstance(exc.__cause__, PccError):
                    raise exc.__cause__ from None
                raise
            timings.append(PassTiming(name, time.perf_counter() - start, outcome.modified))
            model = outcome.model
            results.update((k, v) for k, v in model.meta.items() if k.startswith("pcc."))
        return PipelineResult(model, timings, results)


def preparation_passes() -> list[ir.passes.PassBase]:
    """Make the imported graph analysable: real weight tensors, shapes, static reshapes, attention heads
    split in a layout the channel rules follow, shuffles as Gathers."""
    return [
        FoldConstants(),
        common_passes.ShapeInferencePass(strict_mode=False),
        InferMissingShapes(),
        StaticReshapeTargets(),
        CanonicalAttentionLayout(),
        ChannelShuffleToGather(),
        common_passes.TopologicalSortPass(),
    ]


# `--allocator` names: the allocation passes, and `metanet` (pcc.metanet: the metanetwork transform, then a
# global ranking of its group norms), imported only when asked for (torch-geometric is slow to import)
ALLOCATOR_NAMES = (*ALLOCATORS, "metanet")
GROUP_KINDS = ("channels", "heads")  # what the allocators and PruneChannels remove, as dependency groups
PRUNABLE_KINDS = (*GROUP_KINDS, "blocks", "tokens")  # blocks and tokens have their own passes


def analysis_pipeline(round_to: int = 1) -> Pipeline:
    """Preparation, attention blocks and dependency groups only: what `pcc inspect` runs."""
    return Pipeline([*preparation_passes(), FindAttentionBlocks(), BuildDependencyGroups(round_to, GROUP_KINDS)])


def channel_pruning_pipeline(
    sparsity: float,
    *,
    importance: str = "l2",
    reduction: str = "mean",
    allocator: str = "uniform",
    budget: str = "params",
    round_to: int = 1,
    seed: int = 0,
    calibration: CalibrationData | None = None,
    workers: int | None = None,
    ray_address: str | None = None,
    sensitivity_cache: Path | None = None,
    latency_batch: int = 1,
    latency_repeats: int = 20,
    compare_allocators: bool = False,
    recalibrate_bn: bool = False,
    prune: tuple[str, ...] = ("channels",),
    sparsify: str | None = None,
    metanet: bool = False,
    progress: bool = False,
) -> Pipeline:
    """The default `pcc compile` pipeline: prepare, group, score, [measure], allocate, prune, measure.

    The `dp` allocator adds a sensitivity sweep (on `calibration`, in `workers` processes or on Ray at
    `ray_address`, cached in `sensitivity_cache`); the `latency` budget adds a latency table measured in
    onnxruntime at batch `latency_batch`. `compare_allocators` records what every allocator would keep
    (for the report). `recalibrate_bn` re-estimates BatchNorm statistics on `calibration` after pruning,
    and the sensitivity sweep and comparisons measure variants the same way. `prune` names what may
    lose units: "channels" and/or "heads" (whole attention heads; `sparsity` is then a fraction of
    the selected groups' cost). `sparsify` (a pattern: unstructured, nm:N:M, block:RxC) zeroes weights
    instead of removing units: `sparsity` is then the fraction of the layers' weights made zero, split by
    `allocator` (uniform, global, lamp). `metanet` rewrites the weights with the shipped metanetwork before
    scoring, whatever the allocator (`allocator="metanet"` implies it and ranks its norms globally).
    """
    if allocator not in ALLOCATOR_NAMES:
        raise InvalidRequestError(f"unknown allocator {allocator!r}; choose from {', '.join(ALLOCATOR_NAMES)}")
    if importance not in CRITERIA:
        raise InvalidRequestError(f"unknown importance {importance!r}; choose from {', '.join(CRITERIA)}")
    if reduction not in REDUCTIONS:
        raise InvalidRequestError(f"unknown reduction {reduction!r}; choose from {', '.join(REDUCTIONS)}")
    if budget not in BUDGETS:
        raise InvalidRequestError(f"unknown budget {budget!r}; choose from {', '.join(BUDGETS)}")
    if round_to < 1:
        raise InvalidRequestError(f"--round-to must be a positive integer, got {round_to}")
    if recalibrate_bn and (calibration is None or calibration.synthetic):
        raise InvalidRequestError("BatchNorm recalibration needs real calibration data (--calib)")
    if workers is not None and workers < 1:
        raise InvalidRequestError(f"--workers must be at least 1, got {workers}")
    unknown = sorted(set(prune) - set(PRUNABLE_KINDS))
    if unknown or not prune:
        raise InvalidRequestError(f"cannot prune {', '.join(unknown) or 'nothing'}; choose from {', '.join(PRUNABLE_KINDS)}")
    if sparsify is not None:
        if allocator not in SPARSIFY_ALLOCATORS:
            raise InvalidRequestError(f"--allocator {allocator} does not apply to --sparsify; choose from {', '.join(SPARSIFY_ALLOCATORS)}")
        if prune != ("channels",):
            raise InvalidRequestError("--sparsify zeroes weights instead of removing units; it does not combine with --prune")
        if budget != "params":
            raise InvalidRequestError("--sparsify counts zeroed weights: --budget macs|latency does not apply")
        if metanet:
            raise InvalidRequestError("--metanet prepares networks for removing units; it does not combine with --sparsify")
    groups = tuple(k for k in prune if k in GROUP_KINDS) if sparsify is None else ()
    passes: list[ir.passes.PassBase] = [*preparation_passes(), MeasureCost("before")]
    if "blocks" in prune:
        passes += [FindResidualBlocks(calibration), PruneBlocks(sparsity=sparsity)]
    passes += [
        FindAttentionBlocks(required_by="--prune heads" if "heads" in groups else None),
        BuildDependencyGroups(round_to=round_to, prune=groups),
    ]
    if not groups:  # no channel or head kind asked for: an allocation that keeps every unit
        passes += [ScoreImportance(criterion="l2"), ALLOCATORS["uniform"](sparsity=0.0, budget=budget)]
    else:
        if (metanet or allocator == "metanet") and sparsity > 0:  # at sparsity 0 the output must be the input model
            from pcc.metanet.transform import MetanetTransform

            passes.append(MetanetTransform())
        passes.append(
            ScoreImportance(criterion=importance, reduction=reduction, seed=seed, calibration=calibration, progress=progress)
        )
        if budget == "latency":
            passes.append(MeasureLatency(repeats=latency_repeats, batch=latency_batch, progress=progress))
        if allocator == "dp":
            passes.append(
                MeasureSensitivity(
                    calibration=calibration, workers=workers, ray_address=ray_address, cache=sensitivity_cache,
                    recalibrate_bn=recalibrate_bn, progress=progress,
                )
            )
            passes.append(
                AllocateDP(
                    sparsity=sparsity, budget=budget, calibration=calibration, recalibrate_bn=recalibrate_bn,
                    workers=workers, ray_address=ray_address,
                )
            )
        elif allocator == "metanet":
            from pcc.metanet.transform import AllocateMetanet

            passes.append((AllocateMetanet if sparsity > 0 else ALLOCATORS["global"])(sparsity=sparsity, budget=budget))
        else:
            passes.append(ALLOCATORS[allocator](sparsity=sparsity, budget=budget))
        if compare_allocators:
            passes.append(
                CompareAllocators(
                    sparsity, budget, calibration=calibration, recalibrate_bn=recalibrate_bn, workers=workers,
                    ray_address=ray_address, progress=progress,
                )
            )
    passes.append(PruneChannels())
    if sparsify is not None:
        passes.append(SparsifyWeights(sparsify, sparsity, allocator))
    # after whatever changed the weights; at sparsity 0 the output must be the input model, statistics included
    if recalibrate_bn and sparsity > 0:
        passes.append(RecalibrateBatchNorm(calibration))
    if "tokens" in prune:
        passes += [FindAttentionBlocks(required_by="--prune tokens"), PruneTokens(sparsity=sparsity)]
    passes.append(MeasureCost("after"))
    return Pipeline(passes)
