"""Where passes leave typed results for later passes: the model's `meta` store.

onnx_ir gives every model a `meta` dictionary that is never serialised; analysis passes put their
result objects there under one key per result type, and later passes fetch them by type. A transform
that changes the graph drops the results it invalidates, so a stale analysis can never be read.
"""

from __future__ import annotations

from typing import Protocol, TypeVar

import numpy as np
import onnx_ir as ir

__all__ = ["AnalysisResult", "TracksKeptChannels", "store", "fetch", "lookup", "invalidate"]


class AnalysisResult(Protocol):
    META_KEY: str  # where the result lives in `model.meta`
    PRODUCED_BY: str  # the pass to run to get it (for error messages)


R = TypeVar("R", bound=AnalysisResult)


def store(model: ir.Model, result: AnalysisResult) -> None:
    model.meta[result.META_KEY] = result


def fetch(model: ir.Model, result_type: type[R]) -> R:
    """The result of an earlier pass, or `PreconditionError` naming the pass that must run first."""
    result = model.meta.get(result_type.META_KEY)
    if result is None:
        raise ir.passes.PreconditionError(
            f"{result_type.__name__} not found on the model: run {result_type.PRODUCED_BY} first"
        )
    return result


def lookup(model: ir.Model, result_type: type[R]) -> R | None:
    """The result of an earlier pass if one ran (for optional inputs such as report extras)."""
    return model.meta.get(result_type.META_KEY)


def invalidate(model: ir.Model, *result_types: type[AnalysisResult]) -> None:
    for result_type in result_types:
        model.meta.pop(result_type.META_KEY, None)


class TracksKeptChannels:
    """A stored result that follows channel pruning: `kept` maps (tensor name, axis) to the dense indices the
    pruned tensor's elements along that axis are. `RecordKeptChannels` updates every such result on the model."""

    kept: dict[tuple[str, int], np.ndarray]

    def kept_along(self, name: str, axis: int, size: int) -> np.ndarray:
        """Dense indices of the `size` elements a tensor now has along `axis` (all of them if none went)."""
        return self.kept.get((name, axis), np.arange(size))

    def record(self, kept: dict[tuple[str, int], np.ndarray]) -> None:
        """Add one pruning's kept indices (relative to the tensors as they were), composing with earlier ones."""
        for key, indices in kept.items():
            earlier = self.kept.get(key)
            self.kept[key] = indices if earlier is None else earlier[indices]
