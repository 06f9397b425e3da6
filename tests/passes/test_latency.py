"""Latency tables: single-group savings, calibrated by whole-model measurements, predict an allocation.

A deterministic timer stands in for onnxruntime: a model's "latency" is its MAC count, which is a product
of neighbouring widths, so single-group savings do not add up, as real latencies do not."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from pcc.compiler.pipeline import Pipeline, preparation_passes
from pcc.passes.allocation.allocation import RemovalPlanner, rounded_keep
from pcc.passes.analysis import BuildDependencyGroups, DependencyGroups
from pcc.passes.analysis.cost import count_macs
from pcc.passes.analysis.latency import measure_latency_table
from pcc.passes.transforms.prune_channels import pruned_copy


def _macs_ms(model_bytes: bytes) -> float:
    return count_macs(ir.serde.deserialize_model(onnx.load_from_string(model_bytes))) / 1e6


def _timer(dense: bytes, variant: bytes, feeds=None) -> tuple[float, float]:
    return _macs_ms(dense), _macs_ms(variant)


@pytest.fixture
def vgg(zoo_cache):
    model = zoo_cache.model("vgg")
    groups = Pipeline([*preparation_passes(), BuildDependencyGroups()]).run(model).get(DependencyGroups)
    return model, groups, measure_latency_table(model, groups, _timer)


def _uniform_variant(model, groups, fraction):
    keep = np.asarray([g.num_units for g in groups.groups])
    for g in groups.groups:
        if g.prunable:
            keep[g.index] = rounded_keep(g, fraction * g.num_units)
    removed = RemovalPlanner(groups, np.zeros(groups.num_units)).mask(keep)
    return removed, ir.serde.serialize_model(pruned_copy(model, groups, removed)).SerializeToString()


@pytest.mark.parametrize("fraction", [0.25, 0.5, 0.75])
def test_whole_model_widths_are_predicted_exactly_where_the_sum_is_not(vgg, fraction):
    model, groups, table = vgg
    removed, variant = _uniform_variant(model, groups, fraction)
    cost = table.cost(groups)
    assert cost.remaining(removed) == pytest.approx(_macs_ms(variant), rel=1e-9)
    kept = {g.index: 1.0 - removed[g.units].mean() for g in groups.groups if g.index in table.saved_ms}
    measured_saving = table.dense_ms - _macs_ms(variant)
    assert table.summed(kept) > 1.05 * measured_saving  # products of widths: the plain sum over-predicts


def test_between_measured_widths_the_prediction_is_monotone_and_bounded(vgg):
    model, groups, table = vgg
    cost = table.cost(groups)
    previous = cost.total
    for fraction in np.linspace(0.95, 0.1, 12):
        removed, variant = _uniform_variant(model, groups, fraction)
        remaining = cost.remaining(removed)
        assert 0.0 <= remaining <= previous + 1e-9
        previous = remaining


def test_a_groups_saving_timed_on_its_local_region_is_its_saving_on_the_whole_model(vgg):
    """MACs add up over nodes, so a region that holds every node the group changes saves exactly what the
    whole model saves."""
    model, groups, table = vgg
    dense = _macs_ms(ir.serde.serialize_model(model).SerializeToString())
    planner = RemovalPlanner(groups, np.zeros(groups.num_units))
    full = np.asarray([g.num_units for g in groups.groups])
    half = int(np.searchsorted(table.keep_fractions, 0.5))
    for group in (g for g in groups.groups if g.prunable):
        keep = full.copy()
        keep[group.index] = rounded_keep(group, 0.5 * group.num_units)
        variant = pruned_copy(model, groups, planner.mask(keep))
        whole_saving = dense - _macs_ms(ir.serde.serialize_model(variant).SerializeToString())
        assert whole_saving > 0
        assert table.saved_ms[group.index][half] == pytest.approx(whole_saving, rel=1e-9)
