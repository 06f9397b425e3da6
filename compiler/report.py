"""The summary `pcc compile` prints and, with `--report DIR`, writes as `report.json`."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["CompileReport", "human"]


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
            f"({self.speedup:.2f}x; onnxruntime CPU, median of {self.latency_repeats} interleaved runs)",
            f"  groups     {self.groups_pruned}/{self.groups_total} pruned ({self.allocator}, {self.importance}, "
            f"round_to {self.round_to}), "
            f"{self.units_removed} units removed",
            f"  barriers   {len(self.barriers)}" + (f": {barriers}" if barriers else ""),
            f"  outputs    vs dense on random inputs: max |diff| {self.max_abs_output_diff:.3g} "
            f"(relative {self.max_relative_output_diff:.3g})",
            f"  checks     {', '.join(self.checks)}",
        ]
        return "\n".join(lines)
