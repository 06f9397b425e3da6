"""The `onnx` target: a pruned ONNX file that passes the full checker and runs in onnxruntime.

The pruned model is run against the dense input model on the same random inputs before it is moved
into place, and both are timed in one process, interleaved, so the reported speed-up is a measured
ratio and not a MACs estimate.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pcc.backends.onnx.runtime import compare_outputs, paired_latency, random_inputs, run_pruned_tokens, session
from pcc.backends.onnx.writer import write_checked
from pcc.compiler.errors import InvalidRequestError
from pcc.compiler.pipeline import PipelineResult
from pcc.compiler.report import CompileReport
from pcc.passes.allocation import Allocation
from pcc.passes.allocation.ranks import RankAllocation
from pcc.passes.analysis import CostReport, DependencyGroups
from pcc.passes.analysis.sensitivity import Sensitivity
from pcc.passes.analysis.quantization import FoldedQuantization
from pcc.passes.transforms import BlockPruneReport, PruneReport, TokenPruneReport
from pcc.passes.transforms.reconstruct import ReconstructionReport
from pcc.passes.transforms.factorize_lowrank import FactorizeReport
from pcc.passes.transforms.sparsify_weights import SparsifyReport

__all__ = ["OnnxTarget", "build_report", "describe_transforms"]


@dataclass
class OnnxTarget:
    """Writes the pruned model as ONNX and measures it against the dense one in onnxruntime."""

    name = "onnx"
    # onnxruntime's CPU convolutions work on 8-channel blocks (NCHWc); other widths fall back to slower
    # kernels, and a pruned MobileNetV2 with arbitrary widths measured slower than the dense one.
    preferred_round_to = 8
    repeats: int = 20
    progress: bool = False
    seed: int = 0
    batch: int = 1  # the size given to a symbolic batch axis when timing
    length: int = 128  # the size given to other symbolic axes (a sequence length) when timing
    input_shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)  # --input-shape: whole shapes by input

    def default_output(self, model_path: Path) -> Path:
        return Path.cwd() / f"{model_path.stem}.pruned.onnx"

    def check(self, model) -> None:
        """Nothing to check up front: onnxruntime runs every standard op the loader accepted."""

    def emit(
        self,
        result: PipelineResult,
        dense_model: bytes | str | os.PathLike[str],
        output: Path,
        *,
        model_name: str,
        allocator: str,
        importance: str,
    ) -> CompileReport:
        dense = session(dense_model if isinstance(dense_model, bytes) else str(dense_model))
        feeds = random_inputs(dense, self.seed, symbolic=self.batch, length=self.length, shapes=self.input_shapes)
        try:
            dense_outputs = dense.run(None, feeds)
        except Exception as error:  # onnxruntime raises its own Fail/InvalidArgument/RuntimeException types
            tried = ", ".join(f"{name}={','.join(map(str, value.shape))}" for name, value in feeds.items())
            first = dense.get_inputs()[0].name
            raise InvalidRequestError(
                f"the input model does not run in onnxruntime at the sizes tried ({tried}): "
                f"{str(error).splitlines()[0][:200]}; give sizes that run with --input-shape {first}=D0,D1,..."
            ) from error
        checked: dict[str, object] = {}

        def run_before_commit(staged: Path) -> None:
            pruned = session(staged)
            checked["session"] = pruned
            outputs = run_pruned_tokens(pruned, feeds) if result.get(TokenPruneReport) else pruned.run(None, feeds)
            checked["difference"] = compare_outputs(dense_outputs, outputs)
            checked["reshaped"] = [
                spec.name for spec, a, b in zip(pruned.get_outputs(), dense_outputs, outputs) if a.shape != b.shape
            ]

        write_checked(result.model, output, verify=run_before_commit)
        latency = paired_latency(dense, checked["session"], feeds, repeats=self.repeats, progress=self.progress)
        report = build_report(result, output, model_name, allocator, importance, latency, checked["difference"], self.name)
        report.latency_batch = self.batch
        if any(not isinstance(d, int) or d <= 0 for spec in dense.get_inputs() for d in spec.shape[1:]):
            report.latency_length = self.length
        report.outputs_reshaped = checked["reshaped"]
        describe_transforms(report, result)
        return report


def describe_transforms(report: CompileReport, result: PipelineResult) -> None:
    """The summaries of the transforms beyond channel pruning that ran (metanetwork, blocks, tokens, sparse weights,
    reconstruction, a QDQ model's quantization lifted and put back)."""
    for name, result_type in (("blocks", BlockPruneReport), ("tokens", TokenPruneReport), ("sparsify", SparsifyReport),
                              ("reconstruct", ReconstructionReport), ("quantization", FoldedQuantization)):
        found = result.get(result_type)
        setattr(report, name, found.summary() if found is not None else None)
    # the metanetwork's module (and torch-geometric, slow to import) is loaded only by pipelines that run it
    ranks, factorized = result.get(RankAllocation), result.get(FactorizeReport)
    if factorized is not None:
        report.factorize = f"{ranks.summary()}; {factorized.summary()}" if ranks is not None else factorized.summary()
    metanet = sys.modules.get("pcc.metanet.transform")
    found = result.get(metanet.MetanetReport) if metanet is not None else None
    report.metanet = found.summary() if found is not None else None


def build_report(result, output, model_name, allocator, importance, latency, difference, target) -> CompileReport:
    groups = result.get(DependencyGroups)
    allocation = result.get(Allocation)
    pruning = result.get(PruneReport)
    costs = result.get(CostReport).costs
    before, after = costs["before"], costs["after"]
    # with --factorize the budget is spent on ranks, not on the (untouched) groups
    spent = result.get(RankAllocation) or allocation
    factorized = result.get(FactorizeReport)
    prunable_before = groups.prunable_params if factorized is None else sum(layer.params_before for layer in factorized.layers)
    return CompileReport(
        model=model_name,
        output=str(output),
        target=target,
        allocator=allocator,
        importance=importance,
        round_to=groups.round_to,
        sparsity_target=spent.target,
        params_before=before.params,
        params_after=after.params,
        prunable_params_before=prunable_before,
        prunable_params_after=prunable_before - (before.params - after.params),
        budget=spent.budget,
        budget_removed=spent.achieved,
        macs_before=before.macs,
        macs_after=after.macs,
        latency_ms_before=latency.dense_ms,
        latency_ms_after=latency.pruned_ms,
        latency_repeats=latency.repeats,
        groups_total=len(groups.groups),
        groups_pruned=pruning.groups_pruned,
        units_removed=pruning.units_removed,
        barriers=[{"node": b.node, "op": b.op} for b in groups.barriers],
        max_abs_output_diff=difference.max_abs,
        max_relative_output_diff=difference.max_relative,
        reachable_sparsity=spent.reachable,
        checks=["onnx.checker (full)", "runs in onnxruntime", "atomic write"],
        pass_seconds={t.name: t.seconds for t in result.timings},
        **_analysis_fields(result, allocation),
    )


def _analysis_fields(result, allocation: Allocation) -> dict[str, object]:
    """What the optional analyses (latency table, sensitivity, DP) add to the report."""
    fields: dict[str, object] = {}
    if allocation.budget == "latency":
        fields.update(predicted_latency_ms_before=allocation.cost_before, predicted_latency_ms_after=allocation.cost_after)
    sensitivity = result.get(Sensitivity)
    if sensitivity is not None:
        fields.update(sensitivity_seconds=sensitivity.seconds, sensitivity_reused=sensitivity.reused)
    if allocation.predicted_distortion is not None:
        fields.update(
            distortion_predicted=allocation.predicted_distortion,
            distortion_measured=allocation.candidates.get("dp", allocation.measured_distortion),
            dp_guard="; ".join(allocation.dp_notes()) or None,
            distortion_metric=sensitivity.metric if sensitivity is not None else None,
        )
    return fields
