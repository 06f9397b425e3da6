"""Latency tables: how many milliseconds each group saves at a few widths, measured on the target.

Parameters and MACs are poor stand-ins for time: on a CPU, depthwise and high-resolution layers are
bound by memory traffic, so removing their channels saves time in proportion to width while MACs fall
with its square (a pruned MobileNetV2 measured 1.4x faster for 2.3x fewer MACs). `MeasureLatency`
therefore prunes each group alone to a few keep fractions on a copy of the model and times the copy
against the dense model on the target (onnxruntime today), runs interleaved in one process. Savings are
made monotone (noise can make a narrower layer look slower), interpolated linearly in the kept fraction,
and summed over groups. That sum assumes groups save time independently, and they do not: a convolution
between two pruned groups shrinks in both, so single-group savings overlap (on the Fashion-MNIST CNN at
batch 32, every group at a quarter of its width, the plain sum predicted 3.3 ms saved of a 3.0 ms model;
2.4 ms was measured).
So the whole model is also timed with every group at each of the table's widths, and the summed
savings are mapped through these whole-model measurements (piecewise linear, monotone) before they
predict an allocation's latency; the backend's measurement of the result shows how well that holds.

A single group's saving is timed on its `local_region` only (the layers that read or write its
channels), dense against pruned, fed the dense model's activations entering it: the rest of the network
runs the same either way. On ResNet-50 that made the table 10x cheaper (a region is a few convolutions,
not fifty), and the saving is no longer a small difference of two large, noisy numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
from tqdm.auto import tqdm

from pcc.passes.analysis.dependency_groups import DependencyGroups
from pcc.passes.analysis.regions import (
    Region, group_values, local_region, region_groups, region_model, session_with_region_inputs,
)
from pcc.passes.results import fetch, store

__all__ = ["LatencyTable", "LatencyCost", "MeasureLatency", "entering_activations", "measure_latency_table", "onnxruntime_timer"]

# (dense model bytes, variant model bytes, inputs or None for random ones) -> (dense ms, variant ms), measured together
Timer = Callable[[bytes, bytes, "dict[str, np.ndarray] | None"], tuple[float, float]]


@dataclass
class LatencyTable:
    """Milliseconds saved by each prunable group at each kept fraction (1.0 saves nothing)."""

    META_KEY = "pcc.latency_table"
    PRODUCED_BY = "MeasureLatency"

    dense_ms: float
    keep_fractions: np.ndarray  # ascending, ends with 1.0
    saved_ms: dict[int, np.ndarray]  # group index -> ms saved at each keep fraction
    batch: int
    # whole-model calibration, ascending from (0, 0): summed single-group savings -> measured savings
    summed_ms: np.ndarray = field(default_factory=lambda: np.zeros(1))
    measured_ms: np.ndarray = field(default_factory=lambda: np.zeros(1))

    def saved_by(self, group: int, keep_fraction: float) -> float:
        if group not in self.saved_ms:
            return 0.0
        return float(np.interp(keep_fraction, self.keep_fractions, self.saved_ms[group]))

    def summed(self, kept: dict[int, float]) -> float:
        """The plain sum of single-group savings for these kept fractions (group index -> fraction)."""
        return sum(self.saved_by(group, fraction) for group, fraction in kept.items())

    def saved(self, kept: dict[int, float]) -> float:
        """Predicted milliseconds saved: the summed savings mapped through the whole-model measurements,
        scaled by the last measured ratio beyond the narrowest one."""
        summed = self.summed(kept)
        if summed <= self.summed_ms[-1] or self.summed_ms[-1] <= 0:
            return float(np.interp(summed, self.summed_ms, self.measured_ms))
        return float(summed * self.measured_ms[-1] / self.summed_ms[-1])

    def cost(self, groups: DependencyGroups) -> LatencyCost:
        return LatencyCost(self, groups)


class LatencyCost:
    """The `latency` budget: predicted milliseconds after removing units."""

    name = "latency"

    def __init__(self, table: LatencyTable, groups: DependencyGroups) -> None:
        self.table = table
        self.groups = [g for g in groups.groups if g.index in table.saved_ms]
        self.total = table.dense_ms

    def remaining(self, removed: np.ndarray) -> float:
        saved = self.table.saved({g.index: 1.0 - removed[g.units].mean() for g in self.groups})
        return max(self.total - saved, 0.0)

    def removed_fraction(self, removed: np.ndarray) -> float:
        return 1.0 - self.remaining(removed) / self.total if self.total else 0.0


def onnxruntime_timer(repeats: int = 20, batch: int = 1, seed: int = 0) -> Timer:
    """Times variants against the dense model with the onnx backend's paired measurement, on the given
    inputs or on random ones (symbolic axes at `batch`)."""
    from pcc.backends.onnx.runtime import paired_latency, random_inputs, session

    state: dict[str, object] = {}

    def timer(dense: bytes, variant: bytes, feeds: dict[str, np.ndarray] | None = None) -> tuple[float, float]:
        if state.get("source") is not dense:
            state.update(source=dense, session=session(dense))
            state["random"] = random_inputs(state["session"], seed, symbolic=batch)
        inputs = state["random"] if feeds is None else feeds
        latency = paired_latency(state["session"], session(variant), inputs, repeats=repeats)
        return latency.dense_ms, latency.pruned_ms

    return timer


def entering_activations(model: ir.Model, regions: list[Region], batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """The dense model's activations entering each region, for one random input (symbolic axes at `batch`)."""
    from pcc.backends.onnx.runtime import random_inputs

    sess, computed = session_with_region_inputs(model.clone(), regions)
    feeds = random_inputs(sess, seed, symbolic=batch)
    return feeds | dict(zip(computed, sess.run(computed, feeds)))


def measure_latency_table(
    model: ir.Model,
    groups: DependencyGroups,
    timer: Timer,
    keep_fractions: tuple[float, ...] = (0.25, 0.5, 0.75),
    batch: int = 1,
    progress: bool = False,
    whole_timer: Timer | None = None,
) -> LatencyTable:
    """Single-group savings timed by `timer` on local regions, mapped through whole models timed by
    `whole_timer` (default `timer`): only three of those, and every prediction leans on them."""
    from pcc.passes.allocation.allocation import RemovalPlanner, rounded_keep
    from pcc.passes.transforms.prune_channels import prune_channels, pruned_copy

    fractions = np.asarray(sorted(set(keep_fractions) | {1.0}), dtype=np.float64)
    planner = RemovalPlanner(groups, np.zeros(groups.num_units))
    full = np.asarray([g.num_units for g in groups.groups], dtype=np.int64)
    prunable = [g for g in groups.groups if g.prunable]
    regions = {g.index: local_region(model.graph, group_values(groups, g)) for g in prunable}
    activations = entering_activations(model, list(regions.values()), batch) if prunable else {}
    saved = {g.index: np.zeros(len(fractions)) for g in prunable}
    bar = tqdm(total=len(prunable) * (len(fractions) - 1), desc="latency table", unit="variant", disable=not progress, leave=False)
    for group in prunable:
        sub = region_model(model, regions[group.index])
        sub_bytes, local = ir.serde.serialize_model(sub).SerializeToString(), region_groups(groups, sub)
        feeds = {name: activations[name] for name in regions[group.index].inputs}
        for column, fraction in enumerate(fractions[:-1]):
            keep = full.copy()
            keep[group.index] = rounded_keep(group, fraction * group.num_units)
            variant = sub.clone()
            prune_channels(variant, local, planner.mask(keep))
            dense_ms, variant_ms = timer(sub_bytes, ir.serde.serialize_model(variant).SerializeToString(), feeds)
            saved[group.index][column] = dense_ms - variant_ms
            bar.update()
    bar.close()
    for index, values in saved.items():
        # narrower never saves less: make savings monotone from the full width down, and non-negative
        saved[index] = np.maximum.accumulate(np.maximum(values, 0.0)[::-1])[::-1]
    table = LatencyTable(dense_ms=0.0, keep_fractions=fractions, saved_ms=saved, batch=batch)
    dense = ir.serde.serialize_model(model).SerializeToString()
    summed, measured, dense_times = [0.0], [0.0], []
    for fraction in tqdm(fractions[:-1] if saved else [], desc="latency, whole model", disable=not progress, leave=False):
        keep = full.copy()
        for group in prunable:
            keep[group.index] = rounded_keep(group, fraction * group.num_units)
        variant = pruned_copy(model, groups, planner.mask(keep))
        dense_ms, variant_ms = (whole_timer or timer)(dense, ir.serde.serialize_model(variant).SerializeToString(), None)
        dense_times.append(dense_ms)
        summed.append(table.summed({index: keep[index] / full[index] for index in saved}))
        measured.append(max(dense_ms - variant_ms, 0.0))
    order = np.argsort(summed, kind="stable")
    table.summed_ms = np.asarray(summed)[order]
    table.measured_ms = np.maximum.accumulate(np.asarray(measured)[order])  # more pruning never predicts less saved
    table.dense_ms = float(np.median(dense_times)) if dense_times else 0.0
    return table


# the whole-model timings map every prediction: on ResNet-50, 20 pairs each left their savings
# non-monotone in the width (23.4 ms saved at half width, 20.8 at three quarters)
WHOLE_MODEL_REPEATS = 3


@dataclass
class MeasureLatency(ir.passes.InPlacePass):
    """Analysis: time each group pruned alone on onnxruntime (stores `LatencyTable`; needs groups)."""

    repeats: int = 20
    batch: int = 1  # the size given to a symbolic batch axis
    keep_fractions: tuple[float, ...] = (0.25, 0.5, 0.75)
    progress: bool = field(default=False, repr=False)

    def requires(self, model: ir.Model) -> None:
        fetch(model, DependencyGroups)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        table = measure_latency_table(
            model,
            fetch(model, DependencyGroups),
            onnxruntime_timer(self.repeats, self.batch),
            self.keep_fractions,
            self.batch,
            self.progress,
            whole_timer=onnxruntime_timer(WHOLE_MODEL_REPEATS * self.repeats, self.batch),
        )
        store(model, table)
        return ir.passes.PassResult(model, modified=False)
