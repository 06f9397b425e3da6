"""What a budget counts: exact cost models that predict a cost after removing a set of units.

Parameters and MACs are both sums of products of axis lengths: a weight has prod(its dims) elements, a
convolution costs prod(output dims) x prod(weight dims but the first) MACs. Removing units shortens the
axes that hold them, so one `ProductCost` evaluates either exactly and fast enough for allocators to
search over thousands of candidates. Latency has no such form; `LatencyCost` interpolates a table
measured on the target (see `pcc.passes.analysis.latency`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

import numpy as np
import onnx_ir as ir

from pcc.compiler.options import BUDGETS
from pcc.passes.analysis.dependency_groups import DependencyGroups, is_parameter

__all__ = ["BUDGETS", "Cost", "ProductCost", "param_cost", "mac_cost"]


Factor = tuple[str, int]  # (value name, axis)


class Cost(Protocol):
    """A cost that shrinks as units are removed."""

    name: str
    total: float

    def remaining(self, removed: np.ndarray) -> float: ...

    def removed_fraction(self, removed: np.ndarray) -> float: ...


class ProductCost:
    """Sum over terms of (constant x product of kept lengths of some axes), exact and vectorised."""

    def __init__(self, name: str, groups: DependencyGroups, terms: Iterable[tuple[int, list[Factor]]]) -> None:
        self.name = name
        axes_units: list[np.ndarray] = []
        axis_sizes: list[int] = []
        axis_owner: list[int] = []
        constants: list[int] = []
        for constant, factors in terms:
            term = len(constants)
            for value, axis in factors:
                space = groups.space_id(value, axis)
                units = groups.space_units.get(space) if space is not None else None
                if units is None:
                    size = groups.spaces[space].size if space is not None else 1
                    constant *= size
                else:
                    axes_units.append(units)
                    axis_sizes.append(len(units))
                    axis_owner.append(term)
            constants.append(constant)
        self._constants = np.asarray(constants, dtype=np.int64)
        self._sizes = np.asarray(axis_sizes, dtype=np.int64)
        self._owner = np.asarray(axis_owner, dtype=np.int64)
        self._entry = np.repeat(np.arange(len(axes_units)), [len(u) for u in axes_units])
        flat = np.concatenate(axes_units) if axes_units else np.empty(0, np.int64)
        self._valid = flat >= 0
        self._units = np.maximum(flat, 0)
        self.total = self.remaining(np.zeros(groups.num_units, dtype=bool))

    def remaining(self, removed: np.ndarray) -> int:
        gone = np.bincount(self._entry, weights=removed[self._units] & self._valid, minlength=len(self._sizes))
        kept = self._sizes - gone.astype(np.int64)
        products = np.ones(len(self._constants), dtype=np.int64)
        np.multiply.at(products, self._owner, kept)
        return int((products * self._constants).sum())

    def removed_fraction(self, removed: np.ndarray) -> float:
        return 1.0 - self.remaining(removed) / self.total if self.total else 0.0


def param_cost(model: ir.Model, groups: DependencyGroups) -> ProductCost:
    """Weights that can shrink (an axis in a group that can lose units); the budget of `--budget params`."""
    can_lose = groups.prunable_units()
    terms = []
    for value in model.graph.initializers.values():
        if not is_parameter(value):
            continue
        rank = len(value.const_value.shape)
        if any(_shrinks(groups, value.name, axis, can_lose) for axis in range(rank)):
            terms.append((1, [(value.name, axis) for axis in range(rank)]))
    return ProductCost("params", groups, terms)


def _shrinks(groups: DependencyGroups, value: str, axis: int, can_lose: np.ndarray) -> bool:
    space = groups.space_id(value, axis)
    units = groups.space_units.get(space) if space is not None else None
    return units is not None and bool(can_lose[units[units >= 0]].any())


def mac_cost(model: ir.Model, groups: DependencyGroups) -> ProductCost:
    """MACs of Conv, ConvTranspose, Gemm and MatMul (as `count_macs` counts them)."""
    terms = []
    for node in model.graph:
        if node.domain not in ("", "ai.onnx") or node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            continue
        x, w, y = node.inputs[0], node.inputs[1], node.outputs[0]
        if x.shape is None or w.shape is None or y.shape is None:
            continue
        if node.op_type in ("Conv", "ConvTranspose"):
            driver = y if node.op_type == "Conv" else x
            factors = _axes(driver) + [(w.name, a) for a in range(1, len(w.shape))]
        else:
            trans_a = node.op_type == "Gemm" and node.attributes.get("transA") is not None and node.attributes["transA"].value
            reduction = 0 if trans_a else len(x.shape) - 1
            factors = _axes(y) + [(x.name, reduction)]
        terms.append((1, factors))
    return ProductCost("macs", groups, terms)


def _axes(value: ir.Value) -> list[Factor]:
    return [(value.name, axis) for axis in range(len(value.shape))]
