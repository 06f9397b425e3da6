"""What `--target spatten` reports: simulated cycles, DRAM bytes and energy of the pruned program against
the dense one on the same machine, the measured re-quantization, and the functional model's accuracy.

`SpAttenReport` is the summary `emit` returns (`format()` for the terminal, `to_json()` for report.json);
`write_report_files` adds report.md and the PNG plots (kept tokens and heads per layer; cycles and DRAM,
dense vs pruned, by component and by layer) to a folder.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pcc.backends.spatten.simulator import SimulationResult

__all__ = ["PLOTS", "SpAttenReport", "write_report_files"]

PLOTS = ("kept_per_layer.png", "cycles.png", "dram.png")


def _ratio(before: float, after: float) -> float:
    return before / after if after else float("inf")


@dataclass
class SpAttenReport:
    model: str
    output: str
    config: str  # the machine simulated
    sparsity_target: float  # mean over layers of 1 - token_keep x head_keep, requested
    sparsity_split: str  # how it was split between tokens and heads
    attention_work_removed: float  # the same mean in the program, after flooring to whole tokens and heads
    token_keep: list[float]  # per layer, fraction of the input's tokens
    head_kept: list[int]  # per layer, heads computed
    heads: int
    head_dim: int
    seq_len: int  # L of the simulated workload: the tokens per sentence the emulation ran on
    msb_bits: int
    lsb_bits: int
    tau: float
    samples: int  # sentences the functional model ran on
    requant_fraction: float  # measured: query rows whose MSB-only largest probability was below tau
    requant_fraction_per_layer: list[float]
    cycles_dense: float
    cycles_pruned: float
    dram_bytes_dense: float
    dram_bytes_pruned: float
    energy_dense_j: float
    energy_pruned_j: float
    dense: SimulationResult
    pruned: SimulationResult
    calibration: str = "random inputs"
    accuracy_dense: float | None = None  # top-1 on the calibration labels, dense model in onnxruntime
    accuracy_functional: float | None = None  # the same for the pruned, SpAtten-emulated model
    top1_agreement: float | None = None  # fraction of samples where both models pick the same class
    files: list[str] = field(default_factory=list)
    pass_seconds: dict[str, float] = field(default_factory=dict)
    target: str = "spatten"

    @property
    def speedup(self) -> float:
        return _ratio(self.cycles_dense, self.cycles_pruned)

    @property
    def dram_reduction(self) -> float:
        return _ratio(self.dram_bytes_dense, self.dram_bytes_pruned)

    @property
    def energy_saving(self) -> float:
        return _ratio(self.energy_dense_j, self.energy_pruned_j)

    def to_json(self) -> dict:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("dense", "pruned")}
        data.update(speedup=self.speedup, dram_reduction=self.dram_reduction, energy_saving=self.energy_saving,
                    simulation={"dense": self.dense.to_dict(), "pruned": self.pruned.to_dict()})
        return data

    def format(self) -> str:
        tokens = " ".join(f"{k:.2f}" for k in self.token_keep)
        heads = " ".join(map(str, self.head_kept))
        lines = [
            f"pcc: {self.model} -> {self.output} (target spatten, {self.config})",
            f"  pruning    {self.sparsity_split}; removed {100 * self.attention_work_removed:.1f}% at L={self.seq_len}",
            f"  tokens     kept per layer (of the input's): {tokens}",
            f"  heads      computed per layer (of {self.heads}): {heads}",
            f"  quant      K {self.msb_bits}+{self.lsb_bits} bits, tau {self.tau:g}: {100 * self.requant_fraction:.1f}% of "
            f"rows needed the LSBs (measured on {self.calibration})",
            f"  cycles     {self.cycles_dense:,.0f} -> {self.cycles_pruned:,.0f}  ({self.speedup:.2f}x; attention only, "
            f"BERT mode, L={self.seq_len})",
            f"  DRAM       {self.dram_bytes_dense / 1e6:.3f} MB -> {self.dram_bytes_pruned / 1e6:.3f} MB  "
            f"({self.dram_reduction:.2f}x fewer)",
            f"  energy     {1e6 * self.energy_dense_j:.3f} uJ -> {1e6 * self.energy_pruned_j:.3f} uJ  "
            f"({self.energy_saving:.2f}x less)",
        ]
        if self.accuracy_dense is not None:
            lines.append(f"  accuracy   {100 * self.accuracy_dense:.2f}% -> {100 * self.accuracy_functional:.2f}% top-1 on the "
                         "calibration labels (functional model: pruned + SpAtten arithmetic)")
        if self.top1_agreement is not None:
            lines.append(f"  agreement  {100 * self.top1_agreement:.2f}% of samples: same top-1 as the dense model")
        lines.append(f"  files      {', '.join(self.files)}")
        return "\n".join(lines)


def _markdown(report: SpAttenReport) -> str:
    dense, pruned = report.dense, report.pruned
    md = [
        f"# SpAtten report: {report.model}", "", "```", report.format(), "```", "",
        f"Simulated on {report.config}: attention only (SpAtten does not run the QKV projections or the FFN), BERT mode "
        f"(one pass, every kept token a query), sentences of {report.seq_len} tokens. Dense baseline: the same machine "
        "computing every token and head with whole 12-bit K/V words and no progressive quantization; queries are 16-bit "
        "in both. Energy is dynamic energy only (a lower bound of the chip's).", "",
        "| | dense | pruned | ratio |", "| --- | --- | --- | --- |",
        f"| cycles | {dense.cycles:,.0f} | {pruned.cycles:,.0f} | {report.speedup:.2f}x |",
        f"| time (us) | {1e6 * dense.seconds:.2f} | {1e6 * pruned.seconds:.2f} | |",
        f"| DRAM (bytes) | {dense.dram_bytes:,.0f} | {pruned.dram_bytes:,.0f} | {report.dram_reduction:.2f}x |",
        f"| energy (uJ) | {1e6 * dense.energy_j:.3f} | {1e6 * pruned.energy_j:.3f} | {report.energy_saving:.2f}x |",
        f"| keys fetched | {dense.keys_fetched:,} | {pruned.keys_fetched:,} | {_ratio(dense.keys_fetched, pruned.keys_fetched):.2f}x |",
        "", "## Per layer", "", "![](kept_per_layer.png)", "",
        "| layer | tokens kept | heads | rows needing LSBs | cycles dense | cycles pruned | DRAM dense | DRAM pruned |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for layer, (d, p) in enumerate(zip(dense.per_layer, pruned.per_layer)):
        md.append(f"| {layer} | {report.token_keep[layer]:.2f} | {report.head_kept[layer]} | "
                  f"{100 * report.requant_fraction_per_layer[layer]:.1f}% | {d.cycles:,.0f} | {p.cycles:,.0f} | "
                  f"{d.dram_bytes:,.0f} | {p.dram_bytes:,.0f} |")
    md += ["", "## Cycles and DRAM by component", "", "![](cycles.png)", "", "![](dram.png)", "",
           "| cycles (critical path) | dense | pruned |", "| --- | --- | --- |"]
    md += [f"| {name} | {dense.cycle_breakdown[name]:,.0f} | {pruned.cycle_breakdown[name]:,.0f} |" for name in dense.cycle_breakdown]
    md += ["", "| DRAM bytes | dense | pruned |", "| --- | --- | --- |"]
    md += [f"| {name} | {dense.dram_breakdown[name]:,.0f} | {pruned.dram_breakdown[name]:,.0f} |" for name in dense.dram_breakdown]
    md += ["", "| energy (uJ) | dense | pruned |", "| --- | --- | --- |"]
    md += [f"| {name} | {1e6 * dense.energy_breakdown[name]:.3f} | {1e6 * pruned.energy_breakdown[name]:.3f} |"
           for name in dense.energy_breakdown]
    md += ["", "`program.json` holds every request (pcc's format); `program.csv` the RTL testbench's 17 columns, "
           "`model.onnx` the functional model (pruned, with SpAtten's quantized attention; its last output "
           "`spatten_requant` counts the rows that needed the key LSBs).", ""]
    return "\n".join(md)


def _plot_kept(report: SpAttenReport, path: Path, plt) -> None:
    layers = np.arange(len(report.token_keep))
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(layers, report.token_keep, marker="o", label="tokens (fraction of the input's)")
    ax.plot(layers, np.asarray(report.head_kept) / report.heads, marker="s", label=f"heads (fraction of {report.heads})")
    ax.plot(layers, report.requant_fraction_per_layer, marker="^", linestyle="--", label="rows needing key LSBs")
    ax.set_xlabel("attention layer")
    ax.set_ylabel("fraction")
    ax.set_ylim(0, 1.05)
    ax.set_xticks(layers)
    ax.set_title("Kept per layer (cascade pruning) and measured re-quantization")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_breakdown(report: SpAttenReport, path: Path, plt, breakdown: str, per_layer: str, label: str) -> None:
    """Stacked bars of one breakdown by component (dense vs pruned) and grouped bars per layer."""
    dense, pruned = getattr(report.dense, breakdown), getattr(report.pruned, breakdown)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    bottoms = np.zeros(2)
    for name in dense:
        heights = np.array([dense[name], pruned[name]])
        left.bar(["dense", "pruned"], heights, bottom=bottoms, label=name)
        bottoms += heights
    left.set_ylabel(label)
    left.set_title(f"{label} by component ({report.config})")
    left.legend(fontsize=7)
    layers = np.arange(len(report.dense.per_layer))
    right.bar(layers - 0.2, [getattr(part, per_layer) for part in report.dense.per_layer], 0.4, label="dense")
    right.bar(layers + 0.2, [getattr(part, per_layer) for part in report.pruned.per_layer], 0.4, label="pruned")
    right.set_xticks(layers)
    right.set_xlabel("attention layer")
    right.set_title(f"{label} per layer")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report_files(report: SpAttenReport, directory: Path) -> None:
    """report.json, report.md and the PLOTS into `directory`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _plot_kept(report, directory / PLOTS[0], plt)
    _plot_breakdown(report, directory / PLOTS[1], plt, "cycle_breakdown", "cycles", "cycles")
    _plot_breakdown(report, directory / PLOTS[2], plt, "dram_breakdown", "dram_bytes", "DRAM bytes")
    (directory / "report.md").write_text(_markdown(report))
    (directory / "report.json").write_text(json.dumps(report.to_json(), indent=2) + "\n")
