"""The pass manager: a pipeline is a plain, editable list of `onnx_ir` passes.

Users build one with `channel_pruning_pipeline(...)` or by hand, print it, reorder or extend it like a
list, and run it. Running times every pass and keeps every analysis result a pass produced (even ones
a later transform invalidated on the model), so groups, importance and the allocation can be
inspected after the fact.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import TypeVar

import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from tqdm.auto import tqdm

from pcc.compiler.errors import PccError
from pcc.compiler.options import GROUP_KINDS, CompileOptions
from pcc.passes.allocation import ALLOCATORS, AllocateDP
from pcc.passes.allocation.compare import CompareAllocators
from pcc.passes.analysis.attention import FindAttentionBlocks
from pcc.passes.analysis.cost import MeasureCost
from pcc.passes.analysis.dense_reference import KeepDenseReference, RecordKeptChannels
from pcc.passes.analysis.dependency_groups import BuildDependencyGroups
from pcc.passes.analysis.fused_attention import InferContribShapes
from pcc.passes.analysis.importance import ScoreImportance
from pcc.passes.analysis.latency import MeasureLatency
from pcc.passes.analysis.reshape_shapes import InferReshapeShapes
from pcc.passes.analysis.residual_blocks import FindResidualBlocks
from pcc.passes.analysis.sensitivity import MeasureSensitivity, Repair
from pcc.passes.analysis.shapes import InferMissingShapes
from pcc.passes.transforms.canonical_attention import CanonicalAttentionLayout
from pcc.passes.transforms.channel_shuffle import ChannelShuffleToGather
from pcc.passes.transforms.fold_constants import FoldConstants
from pcc.passes.transforms.fold_quantization import FoldQuantization, RestoreQuantization
from pcc.passes.transforms.reconstruct import Reconstruct
from pcc.passes.transforms.recalibrate_batchnorm import RecalibrateBatchNorm
from pcc.passes.transforms.static_reshape_targets import StaticReshapeTargets
from pcc.passes.transforms.prune_blocks import PruneBlocks
from pcc.passes.transforms.prune_channels import PruneChannels
from pcc.passes.transforms.prune_tokens import PruneTokens
from pcc.passes.transforms.relax_sequence_axis import RelaxSequenceAxis
from pcc.passes.transforms.resolve_symbolic_shapes import ResolveSymbolicShapes
from pcc.passes.transforms.sparsify_weights import SparsifyWeights

__all__ = [
    "Pipeline",
    "PipelineResult",
    "PassTiming",
    "describe_pass",
    "preparation_passes",
    "analysis_pipeline",
    "compile_pipeline",
    "channel_pruning_pipeline",
    "block_passes",
    "group_passes",
    "allocation_passes",
    "repair_passes",
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


def preparation_passes(
    length: int = 128, input_shapes: Mapping[str, tuple[int, ...]] | None = None
) -> list[ir.passes.PassBase]:
    """Make the imported graph analysable: float weights and activations (a QDQ file's lifted), shapes (symbolic axes resolved on copies sized
    `length` or `input_shapes`, the graph itself keeping them), static reshapes, attention heads split in a
    layout the channel rules follow, shuffles as Gathers."""
    from pcc.passes.transforms.remove_no_ops import RemoveNoOps
    from pcc.passes.transforms.unflatten_softmax import UnflattenSoftmax

    return [
        FoldQuantization(),  # a QDQ file is analysed as the float model it stands for (RestoreQuantization puts it back)
        FoldConstants(),
        RemoveNoOps(),  # converters' x + 0 and x * 1 (Paddle's scale op) hide the scaled query from attention
        common_passes.ShapeInferencePass(strict_mode=False),
        InferContribShapes(),  # onnxruntime's shape inference for com.microsoft ops (fused attention), where present
        InferMissingShapes(),
        InferReshapeShapes(),  # run-time Flatten/Reshape targets of converters (Paddle, TF), read through their arithmetic
        ResolveSymbolicShapes(length=length, input_shapes=dict(input_shapes or {})),
        StaticReshapeTargets(),
        UnflattenSoftmax(),  # the opset converter's Flatten → Softmax → Reshape (pre-13 files) hides attention
        CanonicalAttentionLayout(),
        ChannelShuffleToGather(),
        common_passes.TopologicalSortPass(),
    ]


def analysis_pipeline(round_to: int = 1, input_shapes: Mapping[str, tuple[int, ...]] | None = None) -> Pipeline:
    """Preparation, attention blocks and dependency groups only: what `pcc inspect` runs."""
    return Pipeline([
        *preparation_passes(input_shapes=input_shapes), FindAttentionBlocks(), BuildDependencyGroups(round_to, GROUP_KINDS)
    ])


def compile_pipeline(options: CompileOptions) -> Pipeline:
    """The `pcc compile` pipeline for `options`: prepare, then each kind of pruning asked for adds its passes.

    Blocks go first (a removed block's channels need no scoring), then dependency groups (channels,
    heads) or sparse weights, then the repairs that re-fit what remains, then tokens (which change
    what every later layer sees), and the cost is measured before and after.
    """
    # MACs are counted at the sizes latency is timed at, whatever axes the model leaves symbolic
    sizes = {"batch": options.latency_batch, "length": options.latency_length, "input_shapes": dict(options.input_shapes)}
    passes: list[ir.passes.PassBase] = [
        *preparation_passes(options.latency_length, options.input_shapes), MeasureCost("before", **sizes)
    ]
    if options.reconstruct != "none":  # the dense activations are the reconstruction's targets
        passes.append(KeepDenseReference())
    if "blocks" in options.prune:
        passes += block_passes(options)
    passes += group_passes(options)
    passes += factorize_passes(options)
    if options.sparsify is not None:
        passes.append(SparsifyWeights(
            options.sparsify, options.sparsity, options.allocator, criterion=options.importance,
            calibration=options.calibration, exclude_outputs=options.language_model,
        ))
    passes += repair_passes(options)
    if "tokens" in options.prune:
        # a fixed-length export gets a symbolic sequence axis first, so later layers can see fewer tokens
        passes += [RelaxSequenceAxis(), FindAttentionBlocks(required_by="--prune tokens"), PruneTokens(sparsity=options.sparsity)]
    passes += [MeasureCost("after", **sizes), RestoreQuantization()]  # counted as float, as "before" was
    return Pipeline(passes)


def channel_pruning_pipeline(sparsity: float, **options) -> Pipeline:
    """`compile_pipeline(CompileOptions(sparsity, **options))`: the Python API's short form."""
    return compile_pipeline(CompileOptions(sparsity=sparsity, **options))


def block_passes(options: CompileOptions) -> list[ir.passes.PassBase]:
    """Whole residual blocks, the least influential first, until `sparsity` of their parameters are gone."""
    return [FindResidualBlocks(options.calibration), PruneBlocks(sparsity=options.sparsity)]


def factorize_passes(options: CompileOptions) -> list[ir.passes.PassBase]:
    """With `options.factorize`: measure what the allocator needs, choose the ranks, factorise (else nothing).

    Goes after the (empty) group passes and before the repairs: BatchNorm re-estimation then sees the
    factorised layers' outputs.
    """
    if options.factorize is None:
        return []
    from pcc.passes.allocation.ranks import AllocateRanks
    from pcc.passes.analysis.rank_sensitivity import MeasureRankLatency, MeasureRankSensitivity
    from pcc.passes.transforms.factorize_lowrank import FactorizeLowRank

    passes: list[ir.passes.PassBase] = []
    if options.budget == "latency":
        passes.append(MeasureRankLatency(repeats=options.latency_repeats, batch=options.latency_batch))
    if options.allocator == "dp":
        passes.append(MeasureRankSensitivity(calibration=options.calibration))
    allocate = AllocateRanks(options.sparsity, options.budget, options.allocator, calibration=options.calibration)
    return [*passes, allocate, FactorizeLowRank()]


def group_passes(options: CompileOptions) -> list[ir.passes.PassBase]:
    """Dependency groups: find, score, allocate the budget over them, and remove the allocated units.

    With no channel or head kind asked for (blocks or tokens only, or sparse weights), the groups are
    still built, with an allocation that keeps every unit, so later passes see a consistent model.
    """
    kinds = options.group_kinds
    passes: list[ir.passes.PassBase] = [
        FindAttentionBlocks(required_by="--prune heads" if "heads" in kinds else None),
        BuildDependencyGroups(round_to=options.round_to, prune=kinds),
    ]
    if not kinds:
        return [*passes, ScoreImportance(criterion="l2"), ALLOCATORS["uniform"](sparsity=0.0, budget=options.budget),
                RecordKeptChannels(), PruneChannels()]
    if options.uses_metanet:
        from pcc.metanet.transform import MetanetTransform  # torch-geometric: imported only when asked for

        passes.append(MetanetTransform())
    passes.append(ScoreImportance(
        criterion=options.importance, reduction=options.reduction, seed=options.seed, calibration=options.calibration,
        progress=options.progress,
    ))
    if options.budget == "latency":
        passes.append(MeasureLatency(repeats=options.latency_repeats, batch=options.latency_batch, progress=options.progress))
    passes += allocation_passes(options)
    if options.compare_allocators:
        passes.append(CompareAllocators(
            options.sparsity, options.budget, calibration=options.calibration, repair=variant_repair(options),
            progress=options.progress,
        ))
    if options.importance == "flap" and options.sparsity > 0 and options.calibration is not None:
        from pcc.passes.transforms.compensate_bias import CompensateBias

        passes.append(CompensateBias(options.calibration))  # FLAP: removed features' mean folded into the next bias
    return [*passes, RecordKeptChannels(), PruneChannels()]


def allocation_passes(options: CompileOptions) -> list[ir.passes.PassBase]:
    """The allocator named by `options.allocator` (the DP with its sensitivity sweep first)."""
    if options.allocator == "dp":
        final_repair = Repair(recalibrate_bn=options.recalibrate_bn, reconstruct=options.reconstruct)
        return [
            MeasureSensitivity(
                calibration=options.calibration, workers=options.workers, ray_address=options.ray_address,
                cache=options.sensitivity_cache, repair=variant_repair(options), progress=options.progress,
            ),
            AllocateDP(
                sparsity=options.sparsity, budget=options.budget, calibration=options.calibration,
                repair=variant_repair(options), workers=options.workers, ray_address=options.ray_address,
                guard_repair=final_repair,
                # refinement re-measures curves as the sweep does: worth it only where that is how the final
                # model is repaired (ResConcat without reconstruction, 0.3: 81.5% with it, 67.9% without; with
                # `ls` it made the DP's own candidate worse and the guard kept another allocation anyway)
                refine_rounds=REFINE_ROUNDS if final_repair == variant_repair(options) else 0,
            ),
        ]
    if options.importance == "flap" and options.allocator == "global":
        from pcc.passes.allocation.standardised import AllocateStandardised

        # FLAP's one ranking of standardised scores across layers (AllocateGlobal's per-group mean is ~0 here)
        return [AllocateStandardised(sparsity=options.sparsity, budget=options.budget)]
    if options.allocator == "metanet":
        from pcc.metanet.transform import AllocateMetanet

        allocator = AllocateMetanet if options.sparsity > 0 else ALLOCATORS["global"]
        return [allocator(sparsity=options.sparsity, budget=options.budget)]
    return [ALLOCATORS[options.allocator](sparsity=options.sparsity, budget=options.budget)]


REFINE_ROUNDS = 3  # the DP's refinement rounds where the sweep measures variants repaired as the final model


def variant_repair(options: CompileOptions) -> Repair:
    """What every variant a sweep or comparison measures gets before it is measured.

    BatchNorm re-estimation, as the final model gets. Not yet reconstruction: even the cheap form (a
    variant re-fits only the layers its group changed, on its region, from the repaired base's parameters:
    `Repair(reconstruct=...)` from the API) spends over 2.5 CPU-minutes in the first sweep alone on the
    326k-parameter ResConcat CNN, mostly in the node-by-node torch walks and least-squares fits of ~50
    variants, against under a minute without it; on the command line, where `ls` is the default with
    --calib, that would make every calibrated DP compile minutes long. The DP's guard, which compares its
    answer with the simple allocators' on the whole model, does get the final model's reconstruction.
    """
    return Repair(recalibrate_bn=options.recalibrate_bn)


def repair_passes(options: CompileOptions) -> list[ir.passes.PassBase]:
    """After whatever changed the weights: re-fit the layers after them, then re-estimate BatchNorm statistics.

    Reconstruction aims each re-fitted convolution at the dense one's output before its BatchNorm, so the
    statistics re-estimated afterwards only absorb what it could not fit. At sparsity 0 the output must be
    the input model, statistics included, so nothing runs.
    """
    if options.sparsity == 0:
        return []
    passes: list[ir.passes.PassBase] = []
    if options.reconstruct != "none":
        passes.append(Reconstruct(options.calibration, mode=options.reconstruct))
    if options.recalibrate_bn:
        passes.append(RecalibrateBatchNorm(options.calibration))
    return passes
