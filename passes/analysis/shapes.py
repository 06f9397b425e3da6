"""Shapes: finish inference where onnx's own stops, and fix symbolic axes to representative sizes.

InferMissingShapes: finish shape inference where onnx's own leaves a shape-preserving op unknown.

onnx's inference skips some function ops (GroupNormalization-21, for one) and ops of domains it has no
schema for. For the ops whose output has exactly their input's shape (activations, normalisations,
softmax-like ops), the shape is known anyway: it is copied from the input, in graph order, so that
channel analysis does not stop at a value whose shape was never in doubt.

`RelaxedSequence` records the length a fixed-length export was relaxed from (RelaxSequenceAxis).

`specialise_shapes` is a copy of a model with its inputs' symbolic axes fixed (batch 1 and the latency
length by default, `representative_shapes`) and all shape arithmetic folded: what `ResolveSymbolicShapes`
compares, what cost counting and the TVM import read shapes from.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnxscript.optimizer._constant_folding import FoldConstantsPass

from pcc.compiler.errors import InvalidRequestError
from pcc.passes.analysis.channel_rules import SHAPE_PRESERVING_OPS

__all__ = ["InferMissingShapes", "RelaxedSequence", "needs_specialising", "representative_shapes", "specialise_shapes"]

_NO_LIMIT = 1 << 62


def needs_specialising(model: ir.Model, input_shapes: Mapping[str, tuple[int, ...]] | None = None) -> bool:
    """Whether some input has symbolic axes and every input's shape is known (or given), so that
    `representative_shapes` can size them all; a model with an input of unknown rank is left as it is."""
    given = input_shapes or {}
    shapes = [v.shape for v in model.graph.inputs if v.name not in given]
    return all(s is not None for s in shapes) and (
        bool(given) or any(not isinstance(d, int) for s in shapes for d in s)
    )


def representative_shapes(
    model: ir.Model, batch: int = 1, length: int = 128, input_shapes: Mapping[str, tuple[int, ...]] | None = None
) -> dict[str, list[int]]:
    """Every input's shape with its symbolic axes given sizes: the user's `input_shapes` where named, else
    `batch` for axis 0 and `length` for the others; one symbol gets one size wherever it appears."""
    given = dict(input_shapes or {})
    inputs = {v.name: v for v in model.graph.inputs}
    unknown = sorted(set(given) - set(inputs))
    if unknown:
        raise InvalidRequestError(f"--input-shape names {', '.join(unknown)}, but the model's inputs are {', '.join(inputs)}")
    sizes: dict[str, int] = {}
    for name, dims in given.items():
        shape = inputs[name].shape
        if shape is not None and len(shape) != len(dims):
            raise InvalidRequestError(f"--input-shape {name}: the input has {len(shape)} axes, got {len(dims)} sizes")
        for dim, size in zip(shape or (), dims):
            if isinstance(dim, int) and dim != size:
                raise InvalidRequestError(f"--input-shape {name}: axis of static size {dim} given {size}")
            if not isinstance(dim, int) and dim.value is not None:
                sizes.setdefault(dim.value, int(size))
    shapes = {}
    for value in model.graph.inputs:
        if value.name in given:
            shapes[value.name] = [int(d) for d in given[value.name]]
            continue
        if value.shape is None:
            raise InvalidRequestError(f"input '{value.name}' has no shape; give it with --input-shape {value.name}=d0,d1,...")
        dims = []
        for axis, dim in enumerate(value.shape):
            if isinstance(dim, int):
                dims.append(dim)
                continue
            default = batch if axis == 0 else length
            dims.append(sizes.setdefault(dim.value, default) if dim.value is not None else default)
        shapes[value.name] = dims
    return shapes


def specialise_shapes(model: ir.Model, input_shapes: Mapping[str, list[int]]) -> ir.Model:
    """A copy of `model` with its inputs' shapes fixed and everything computable from them folded, with
    every value's shape inferred. Value names are kept, so the copy's values can be matched to `model`'s."""
    # imported here: the transforms package imports the analyses, so a module-level import would be circular
    from pcc.passes.transforms.fold_constants import _fold_everything

    copy = ir.serde.deserialize_model(ir.serde.serialize_model(model))
    for value in copy.graph.inputs:
        if value.name in input_shapes:
            value.shape = ir.Shape(list(input_shapes[value.name]))
    FoldConstantsPass(shape_inference=True, input_size_limit=_NO_LIMIT, output_size_limit=_NO_LIMIT,
                      should_fold=_fold_everything)(copy)
    common_passes.ShapeInferencePass(strict_mode=False)(copy)
    return copy



@dataclass
class RelaxedSequence:
    """What RelaxSequenceAxis did to a fixed-length export: the length it was made at (what its cost and
    latency are measured at), the inputs it relaxed and the nodes whose constants encoded the length."""

    META_KEY = "pcc.relaxed_sequence"
    PRODUCED_BY = "RelaxSequenceAxis"

    length: int
    inputs: list[str]
    rewritten: list[str]  # the nodes whose constants encoded the length


@dataclass
class InferMissingShapes(ir.passes.InPlacePass):
    """Copy input 0's shape and type to output 0 of shape-preserving ops whose output has none."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for node in model.graph:
            if node.domain not in ("", "ai.onnx") or node.op_type not in SHAPE_PRESERVING_OPS:
                continue
            source, target = node.inputs[0], node.outputs[0]
            if target.shape is None and source is not None and source.shape is not None:
                target.shape = ir.Shape(list(source.shape))
                if target.dtype is None:
                    target.dtype = source.dtype
                modified = True
        return ir.passes.PassResult(model, modified)
