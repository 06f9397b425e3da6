"""The summary `pcc compile` prints and, with `--report DIR`, writes as report.json, report.md and PNGs.

The Markdown report is for people deciding whether to ship the result: what was removed and what it
bought (measured), what each allocator would have kept, how each group's distortion grows as it is
narrowed, and how quality falls with sparsity under each allocator.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["CompileReport", "human", "plot_lines", "write_report"]


def human(count: float) -> str:
    """12345678 -> '12.35M'."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(count) >= scale:
            return f"{count / scale:.2f}{unit}"
    return f"{count:.0f}"


@dataclass
class CompileReport:
    model: str
    output: str
    target: str
    allocator: str
    importance: str
    round_to: int
    sparsity_target: float
    params_before: int  # every weight element of the model
    params_after: int
    prunable_params_before: int  # weights with at least one prunable axis
    prunable_params_after: int
    budget: str  # what sparsity_target is a fraction of
    budget_removed: float  # the fraction of it removed (predicted, for latency)
    macs_before: int
    macs_after: int
    latency_ms_before: float
    latency_ms_after: float
    latency_repeats: int
    groups_total: int
    groups_pruned: int
    units_removed: int
    barriers: list[dict[str, str]]
    max_abs_output_diff: float
    max_relative_output_diff: float
    reachable_sparsity: float
    checks: list[str] = field(default_factory=list)
    pass_seconds: dict[str, float] = field(default_factory=dict)
    calibration: str = "random inputs"
    latency_batch: int = 1
    predicted_latency_ms_before: float | None = None  # the latency table's, for the latency budget
    predicted_latency_ms_after: float | None = None
    distortion_predicted: float | None = None  # the DP's additivity check
    distortion_measured: float | None = None
    distortion_metric: str | None = None
    dp_guard: str | None = None  # the DP's guard: its joint distortion vs the simple allocators', and which it kept
    sensitivity_seconds: float | None = None
    sensitivity_reused: bool = False
    calib_accuracy_before: float | None = None  # on the calibration data, when it has labels
    calib_accuracy_after: float | None = None
    metanet: str | None = None  # the MetanetReport summary, with --metanet or --allocator metanet
    blocks: str | None = None  # the BlockPruneReport summary, with --prune blocks
    tokens: str | None = None  # the TokenPruneReport summary, with --prune tokens
    sparsify: str | None = None  # the SparsifyReport summary, with --sparsify
    factorize: str | None = None  # the RankAllocation and FactorizeReport summaries, with --factorize
    perplexity_dense: float | None = None  # language models with --eval FILE.txt
    perplexity_pruned: float | None = None
    perplexity_text: str | None = None  # what the perplexities were measured on
    reconstruct: str | None = None  # the ReconstructionReport summary, with --reconstruct bias|ls
    quantization: str | None = None  # the FoldedQuantization summary, for a QDQ-quantized model
    latency_engine: str = "onnxruntime CPU"  # what ran the timed models (dense always in onnxruntime)
    latency_length: int | None = None  # the size given to other symbolic input axes (sequence length) when timing
    outputs_reshaped: list[str] = field(default_factory=list)  # outputs whose shape pruning changed (token axes)

    @property
    def prunable_removed(self) -> float:
        return 1 - self.prunable_params_after / self.prunable_params_before if self.prunable_params_before else 0.0

    @property
    def macs_ratio(self) -> float:
        return self.macs_before / self.macs_after if self.macs_after else float("inf")

    @property
    def speedup(self) -> float:
        return self.latency_ms_before / self.latency_ms_after if self.latency_ms_after else float("inf")

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        data.update(prunable_removed=self.prunable_removed, macs_ratio=self.macs_ratio, speedup=self.speedup)
        return data

    def write_json(self, directory: str | os.PathLike[str]) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "report.json"
        tmp = path.with_name(".report.json.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        os.replace(tmp, path)
        return path

    def format(self) -> str:
        reach = ""
        if self.sparsity_target > self.reachable_sparsity + 1e-9:
            reach = f"; best reachable {100 * self.reachable_sparsity:.1f}%"
        barriers = ", ".join(f"{b['op']} '{b['node']}'" for b in self.barriers[:5])
        if len(self.barriers) > 5:
            barriers += f", +{len(self.barriers) - 5} more"
        lines = [
            f"pcc: {self.model} -> {self.output} (target {self.target})",
            f"  budget     {self.budget}: -{100 * self.budget_removed:.1f}% (target {100 * self.sparsity_target:.1f}%{reach})",
            f"  params     {human(self.params_before)} -> {human(self.params_after)}  "
            f"(-{100 * (1 - self.params_after / max(self.params_before, 1)):.1f}% of all; "
            f"-{100 * self.prunable_removed:.1f}% of prunable)",
            f"  MACs       {human(self.macs_before)} -> {human(self.macs_after)}  ({self.macs_ratio:.2f}x fewer)",
            f"  latency    {self.latency_ms_before:.2f} ms -> {self.latency_ms_after:.2f} ms  "
            f"({self.speedup:.2f}x; {self.latency_engine}, batch {self.latency_batch}"
            + (f", length {self.latency_length}" if self.latency_length else "")
            + f", median of {self.latency_repeats} interleaved runs)",
            f"  groups     {self.groups_pruned}/{self.groups_total} pruned ({self.allocator}, {self.importance}, "
            f"round_to {self.round_to}), "
            f"{self.units_removed} units removed",
            f"  barriers   {len(self.barriers)}" + (f": {barriers}" if barriers else ""),
            f"  outputs    vs dense on random inputs: max |diff| {self.max_abs_output_diff:.3g} "
            f"(relative {self.max_relative_output_diff:.3g})"
            + (f"; {', '.join(self.outputs_reshaped)} now hold the kept tokens only" if self.outputs_reshaped else ""),
            f"  checks     {', '.join(self.checks)}",
        ]
        lines[5:5] = self._analysis_lines()
        return "\n".join(lines)

    def _analysis_lines(self) -> list[str]:
        lines = [f"  calib      {self.calibration}"]
        if self.quantization:
            lines.append(f"  quant      {self.quantization}")
        if self.metanet:
            lines.append(f"  {self.metanet}")
        if self.blocks:
            lines.append(f"  blocks     {self.blocks}")
        if self.tokens:
            lines.append(f"  tokens     {self.tokens}")
        if self.sparsify:
            lines.append(f"  sparsify   {self.sparsify}")
        if self.factorize:
            lines.append(f"  factorize  {self.factorize}")
        if self.reconstruct:
            lines.append(f"  reconstruct {self.reconstruct}")
        if self.predicted_latency_ms_after is not None:
            lines.append(
                f"  predicted  latency {self.predicted_latency_ms_before:.2f} ms -> {self.predicted_latency_ms_after:.2f} ms "
                f"from the latency table ({self.predicted_latency_ms_before / self.predicted_latency_ms_after:.2f}x; "
                f"measured {self.speedup:.2f}x)"
            )
        if self.sensitivity_seconds is not None:
            how = "reused from cache" if self.sensitivity_reused else f"measured in {self.sensitivity_seconds:.1f} s"
            lines.append(f"  sensitivity {how}")
        if self.distortion_predicted is not None:
            lines.append(
                f"  additivity sum of single-group distortions {self.distortion_predicted:.4g}, "
                f"measured jointly {self.distortion_measured:.4g} ({self.distortion_metric})"
            )
        if self.dp_guard:
            lines.append(f"  guard      {self.dp_guard}")
        if self.perplexity_dense is not None:
            lines.append(f"  perplexity {self.perplexity_dense:.2f} -> {self.perplexity_pruned:.2f}  ({self.perplexity_text})")
        if self.calib_accuracy_before is not None:
            lines.append(
                f"  accuracy   {100 * self.calib_accuracy_before:.2f}% -> {100 * self.calib_accuracy_after:.2f}% "
                "top-1 on the calibration data (no fine-tune)"
            )
        return lines


def plot_lines(curves: dict[str, tuple[list[float], list[float]]], path, *, xlabel: str, ylabel: str, title: str,
               reference: float | None = None, reference_label: str = "dense") -> Path:
    """One line per named (x, y) curve, with an optional horizontal reference line; saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, (x, y) in curves.items():
        ax.plot(x, y, marker="o", label=name)
    if reference is not None:
        ax.axhline(reference, color="black", linestyle="--", linewidth=1, label=reference_label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plot_keep_fractions(comparison, names: list[str], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = len(comparison.groups)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.3 * count + 2), 4.5))
    width = 0.8 / max(len(comparison.keep_fractions), 1)
    for i, (method, fractions) in enumerate(comparison.keep_fractions.items()):
        label = f"{method} (-{100 * comparison.achieved[method]:.1f}% {comparison.budget})"
        ax.bar(np.arange(count) + i * width, fractions, width, label=label)
    ax.set_xticks(np.arange(count) + 0.4 - width / 2)
    ax.set_xticklabels([names[g] for g in comparison.groups], rotation=90, fontsize=6)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("kept fraction of units")
    ax.set_title(f"Kept width per group at {100 * comparison.target:.0f}% {comparison.budget} sparsity")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(directory: str | os.PathLike[str], report: CompileReport, result) -> Path:
    """report.json, report.md and the PNGs the analyses that ran allow; returns the Markdown path."""
    from pcc.passes.allocation.compare import AllocatorComparison
    from pcc.passes.analysis.dependency_groups import DependencyGroups
    from pcc.passes.analysis.sensitivity import Sensitivity
    from pcc.passes.transforms.reconstruct import ReconstructionReport

    directory = Path(directory)
    report.write_json(directory)
    names = [g.name for g in result.get(DependencyGroups).groups]
    md = [f"# pcc report: {report.model}", "", "```", report.format(), "```", ""]
    comparison = result.get(AllocatorComparison)
    if comparison is not None:
        _plot_keep_fractions(comparison, names, directory / "keep_ratios.png")
        md += [f"## Kept width per group, every allocator ({comparison.budget} budget)", "", "![](keep_ratios.png)", ""]
        md += ["| allocator | removed | summed single-group distortion |", "|---|---|---|"]
        for method, achieved in comparison.achieved.items():
            distortion = comparison.predicted_distortion.get(method)
            md.append(f"| {method} | {100 * achieved:.1f}% | {'n/a' if distortion is None else f'{distortion:.4g}'} |")
        curves = {m: (list(comparison.sparsities), q) for m, q in comparison.quality.items()}
        plot_lines(
            curves, directory / "quality_vs_sparsity.png", xlabel=f"fraction of {comparison.budget} removed",
            ylabel=comparison.quality_name, title="Quality vs sparsity on the calibration data (no fine-tune)",
            reference=comparison.dense_quality,
        )
        md += ["", f"## {comparison.quality_name} vs sparsity (calibration data, no fine-tune)", "",
               "![](quality_vs_sparsity.png)", "",
               "| allocator | " + " | ".join(f"{s:.1f}" for s in comparison.sparsities) + " |",
               "|---|" + "---|" * len(comparison.sparsities)]
        for method, values in comparison.quality.items():
            md.append(f"| {method} | " + " | ".join(f"{v:.4g}" for v in values) + " |")
        md.append("")
    reconstruction = result.get(ReconstructionReport)
    if reconstruction is not None and reconstruction.layers:
        md += ["## Reconstruction: each re-fitted layer's error vs the dense model", "",
               "Relative squared error of the layer's output on the calibration data, before and after its re-fit.", "",
               "```", reconstruction.table(), "```", ""]
    sensitivity = result.get(Sensitivity)
    if sensitivity is not None:
        sensitivity.plot(directory / "rd_curves.png", names=names)
        md += ["## Per-group rate-distortion curves", "", "![](rd_curves.png)", ""]
    path = directory / "report.md"
    tmp = path.with_name(".report.md.tmp")
    tmp.write_text("\n".join(md) + "\n")
    os.replace(tmp, path)
    return path
