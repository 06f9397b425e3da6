"""ChannelShuffleToGather: Reshape -> Transpose -> Reshape permutations of one axis become a Gather.

ShuffleNet's channel shuffle splits C into (g, C/g), swaps the two and merges them back. As written it
forces every group to keep the same channels (removing channel i of one group needs channel i of every
other group), which ties all of a ShuffleNet stage together. The same permutation as a Gather with
constant indices lets any channel go: the Gather's indices are simply rewritten after pruning. The
rewrite is exact (a Gather copies the same elements a transpose would) and only fires when the
three nodes together permute a single axis and leave every other axis alone; a dynamic batch is fine.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnxscript.rewriter import RewritePass
from onnxscript.rewriter._basics import MatchResult
from onnxscript.rewriter._rewrite_rule import RewriteRuleClassBase, RewriteRuleSet

__all__ = ["ChannelShuffleToGather", "single_axis_permutation"]


def _dims(shape: ir.Shape | None) -> list[int | str] | None:
    """Static sizes, with named symbolic dims kept as their names; None if any dim is unknown."""
    if shape is None:
        return None
    dims = [d if isinstance(d, int) else d.value for d in shape]
    return None if any(d is None for d in dims) else dims


def _substitute(dims: list[int | str], size: int) -> tuple[int, ...]:
    return tuple(size if isinstance(d, str) else d for d in dims)


def single_axis_permutation(
    in_shape: tuple[int, ...], grouped: tuple[int, ...], perm: list[int], out_shape: tuple[int, ...]
) -> tuple[int, np.ndarray] | None:
    """(axis, indices) if reshape(grouped) -> transpose(perm) -> reshape(out) permutes one axis only."""
    if in_shape != out_shape:
        return None
    positions = np.arange(int(np.prod(in_shape))).reshape(in_shape)
    moved = positions.reshape(grouped).transpose(perm).reshape(out_shape)
    changed = [a for a in range(len(in_shape)) if _varies(moved, positions, a)]
    if len(changed) != 1:
        return None
    axis = changed[0]
    stride = int(np.prod(in_shape[axis + 1 :]))
    first = tuple(0 if a != axis else slice(None) for a in range(len(in_shape)))
    indices = (moved[first] // stride) % in_shape[axis]
    if not np.array_equal(np.take(positions, indices, axis=axis), moved):
        return None
    return axis, indices.astype(np.int64)


def _varies(moved: np.ndarray, positions: np.ndarray, axis: int) -> bool:
    """Whether the elements' coordinate along `axis` changes."""
    shape = positions.shape
    stride = int(np.prod(shape[axis + 1 :]))
    return not np.array_equal((moved // stride) % shape[axis], (positions // stride) % shape[axis])


def _match(x: ir.Value, grouped: ir.Value, swapped: ir.Value, merged: ir.Value) -> tuple[int, np.ndarray] | None:
    shapes = [_dims(v.shape) for v in (x, grouped, merged)]
    if any(s is None for s in shapes):
        return None
    perm_attr = swapped.producer().attributes.get("perm")
    perm = list(perm_attr.value) if perm_attr is not None else list(reversed(range(len(shapes[1]))))
    # A named symbolic dim (a dynamic batch) is solved for with two different sizes: if it took part in
    # the permutation, the two answers would differ.
    found = [single_axis_permutation(*[_substitute(s, size) for s in shapes[:2]], perm, _substitute(shapes[2], size)) for size in (2, 3)]
    if found[0] is None or found[1] is None:
        return None
    if found[0][0] != found[1][0] or not np.array_equal(found[0][1], found[1][1]):
        return None
    return found[0]


class _ShuffleRule(RewriteRuleClassBase):
    def pattern(self, op, x, grouped_shape, merged_shape):
        grouped = op.Reshape(x, grouped_shape, _allow_other_attributes=True, _outputs=["grouped"])
        swapped = op.Transpose(grouped, _allow_other_attributes=True, _outputs=["swapped"])
        return op.Reshape(swapped, merged_shape, _allow_other_attributes=True, _outputs=["merged"])

    def check(self, context, x, grouped, swapped, merged, **_) -> MatchResult:
        result = MatchResult()
        if _match(x, grouped, swapped, merged) is None:
            return result.fail("not a static permutation of a single axis")
        return result

    def rewrite(self, op, x, grouped, swapped, merged, **_):
        axis, indices = _match(x, grouped, swapped, merged)
        output = op.Gather(x, op.initializer(ir.tensor(indices), name=f"{merged.name}_shuffle_indices"), axis=axis)
        output.shape = merged.shape
        output.dtype = merged.dtype
        return output


@dataclass
class ChannelShuffleToGather(ir.passes.InPlacePass):
    """Transform: rewrite single-axis Reshape/Transpose/Reshape permutations as Gather (needs shapes)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        result = RewritePass(RewriteRuleSet([_ShuffleRule.rule()]))(model)
        if result.modified:
            common_passes.RemoveUnusedNodesPass()(model)  # the old shape constants
        return ir.passes.PassResult(model, result.modified)
