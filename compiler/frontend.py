"""Frontends: everything a user can hand to pcc becomes one `onnx_ir.Model`.

Three ways in: an ONNX file (external data next to it is read), a PyTorch `nn.Module` with example
inputs, and a `torch.fx.GraphModule`. The PyTorch paths go through `torch.onnx.export(dynamo=True)`,
which keeps parameter names as initializer names, so a pruned initializer can be traced back to the
module attribute it came from.

Import also normalises what every later pass would otherwise have to special-case: opsets older than
`CANONICAL_OPSET` are converted up (attributes such as Split sizes and Squeeze axes became inputs in
opset 13), initializers listed as graph inputs (old exporters did that) stop being inputs, and every value
gets a name.

Files from other converters break in ways exports from torch do not, so import repairs what it can and
refuses the rest before any pass runs (see `_repair_shapes` and `_check_weight_shapes`): paddle2onnx
writes -1 for a dynamic dimension (invalid ONNX: onnx's checker then compares inferred sizes with it
and fails on the written model), converters leave value_info from before their own rewrites (onnx's
inference then fails on "inferred vs existing shape"), and a hand-edited or half-converted file can give
a layer a weight that does not fit its input, which otherwise surfaces as an IndexError deep in
pruning or an onnxruntime error after it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import onnx
import onnx.version_converter
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from google.protobuf.message import DecodeError

from pcc.compiler.errors import ModelLoadError, PccError, UnsupportedModelError

__all__ = [
    "CANONICAL_OPSET",
    "MAX_OPSET",
    "load_onnx",
    "from_proto",
    "from_torch",
    "from_fx",
]

# Oldest default-domain opset the channel rules read natively; older models are converted up to it.
CANONICAL_OPSET = 13
# Newest default-domain opset pcc's rules were written against.
MAX_OPSET = 23
# Older than this, onnx's version converter has no adapters worth trusting.
MIN_OPSET = 7


def load_onnx(path: str | os.PathLike[str]) -> ir.Model:
    """Read an ONNX file (and its external data) into the IR, or raise `ModelLoadError`.

    The file is only read, never written: pcc must leave its input byte-identical.
    """
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file")
    if path.is_dir():
        raise ModelLoadError(f"{path}: is a directory, expected an .onnx file")
    if path.suffix.lower() != ".onnx":
        raise ModelLoadError(f"{path}: expected an ONNX model file ending in .onnx")
    if path.stat().st_size == 0:
        raise ModelLoadError(f"{path}: file is empty")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{path}: not a valid ONNX model (truncated or corrupt: {_first_line(exc)})") from None
    _check_looks_like_onnx(proto, path)
    _load_external_data(proto, path)
    _check(str(path), str(path))  # by path: works past protobuf's 2 GB limit
    return from_proto(proto, source=str(path), check=False)


def from_proto(proto: onnx.ModelProto, source: str = "<model>", check: bool = True) -> ir.Model:
    """Validate an in-memory `ModelProto`, convert old opsets, and return the normalised IR."""
    if check:
        _check(proto, source)
    proto = _convert_opset(proto, source)
    inferred = _repair_shapes(proto)
    _check_weight_shapes(inferred, source)
    return _normalise(ir.serde.deserialize_model(proto))


def from_torch(
    module: Any,
    example_inputs: Sequence[Any],
    *,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    opset_version: int | None = None,
    optimize: bool = True,
    dynamic_batch: bool = False,
    dynamic_sequence: bool = False,
    dynamic_shapes: Any = None,
) -> ir.Model:
    """Export a PyTorch `nn.Module` with `torch.onnx.export(dynamo=True)` and return the IR.

    The module is exported in eval mode with the example inputs' static shapes; initializer names are
    the module's parameter names (e.g. ``layer1.0.conv1.weight``). The exporter's optimizer folds
    BatchNorm into the preceding convolution; `optimize=False` keeps BatchNormalization nodes (needed
    by the `bn` importance criterion). `dynamic_batch` makes axis 0 of every input symbolic, so the
    model takes any batch size (calibration, fine-tuning, serving); give examples with a batch of 2 or
    more, since the exporter specialises a batch of 1. `dynamic_sequence` does the same for axis 1 of
    every input of rank 2 or more (token pruning needs it: later layers see fewer tokens than the input).
    `dynamic_shapes` (torch.export's own per-input spec) replaces both where other axes vary, e.g. the
    length axis of a KV cache.
    """
    import torch

    if not isinstance(module, torch.nn.Module):
        raise PccError(f"from_torch expects a torch.nn.Module, got {type(module).__name__}")
    modes = {m: m.training for m in module.modules()}  # restored one by one: a train() call would recurse
    module.eval()
    try:
        program = torch.onnx.export(
            module,
            tuple(example_inputs),
            dynamo=True,
            input_names=list(input_names) if input_names else None,
            output_names=list(output_names) if output_names else None,
            opset_version=opset_version,
            optimize=optimize,
            dynamic_shapes=dynamic_shapes or _dynamic_shapes(example_inputs, dynamic_batch, dynamic_sequence),
            verbose=False,
        )
    except Exception as exc:  # the exporter raises many unrelated types; all mean "cannot export"
        raise UnsupportedModelError(f"torch.onnx.export failed: {_first_line(exc)}") from None
    finally:
        for submodule, training in modes.items():
            submodule.training = training
    return from_proto(ir.serde.serialize_model(program.model), source=type(module).__name__)


def _dynamic_shapes(example_inputs: Sequence[Any], batch: bool, sequence: bool) -> tuple | None:
    import torch

    if not (batch or sequence):
        return None
    axes = ([0] if batch else []) + ([1] if sequence else [])
    return tuple({a: torch.export.Dim.DYNAMIC for a in axes if a < x.dim()} for x in example_inputs)


def from_fx(graph_module: Any, example_inputs: Sequence[Any], **kwargs: Any) -> ir.Model:
    """Import a `torch.fx.GraphModule` (it is an `nn.Module`, so it exports like one)."""
    import torch.fx

    if not isinstance(graph_module, torch.fx.GraphModule):
        raise PccError(f"from_fx expects a torch.fx.GraphModule, got {type(graph_module).__name__}")
    return from_torch(graph_module, example_inputs, **kwargs)


def _check(model: onnx.ModelProto | str, source: str) -> None:
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise ModelLoadError(f"{source}: invalid ONNX model: {_first_line(exc)}") from None


def _check_looks_like_onnx(proto: onnx.ModelProto, path: Path) -> None:
    # Random bytes sometimes parse as a protobuf message; a real model has an IR version, an opset and
    # a graph with at least one output.
    if proto.ir_version <= 0 or not proto.opset_import or not proto.graph.output:
        raise ModelLoadError(f"{path}: not an ONNX model (no IR version, opset or graph outputs)")


def _load_external_data(proto: onnx.ModelProto, path: Path) -> None:
    from onnx.external_data_helper import load_external_data_for_model, uses_external_data

    if not any(uses_external_data(t) for t in _all_tensors(proto)):
        return
    try:
        load_external_data_for_model(proto, str(path.parent))
    except (OSError, ValueError, onnx.checker.ValidationError) as exc:
        raise ModelLoadError(f"{path}: external data could not be read ({_first_line(exc)})") from None
    for tensor in _all_tensors(proto):
        expected = _expected_nbytes(tensor)
        if expected is not None and len(tensor.raw_data) != expected:
            raise ModelLoadError(
                f"{path}: external data of tensor '{tensor.name}' is truncated "
                f"({len(tensor.raw_data)} of {expected} bytes)"
            )


def _all_tensors(proto: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Initializers and tensor attributes of every graph, subgraphs included."""
    graphs = [proto.graph]
    while graphs:
        graph = graphs.pop()
        yield from graph.initializer
        for node in graph.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors
                if attr.HasField("g"):
                    graphs.append(attr.g)
                graphs.extend(attr.graphs)


def _expected_nbytes(tensor: onnx.TensorProto) -> int | None:
    if not tensor.HasField("raw_data"):
        return None
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, TypeError, ValueError):
        return None
    return math.prod(tensor.dims) * itemsize


def _default_opset(proto: onnx.ModelProto) -> int:
    for entry in proto.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    raise UnsupportedModelError("model imports no default-domain (ai.onnx) opset")


def _convert_opset(proto: onnx.ModelProto, source: str) -> onnx.ModelProto:
    version = _default_opset(proto)
    if version < MIN_OPSET or version > MAX_OPSET:
        raise UnsupportedModelError(
            f"{source}: unsupported opset {version} (pcc handles opsets {MIN_OPSET}..{MAX_OPSET})"
        )
    if version >= CANONICAL_OPSET:
        return proto
    try:
        converted = onnx.version_converter.convert_version(proto, CANONICAL_OPSET)
    except Exception as exc:  # the converter raises bare RuntimeErrors and IndexErrors alike
        raise UnsupportedModelError(
            f"{source}: cannot convert opset {version} to {CANONICAL_OPSET}: {_first_line(exc)}"
        ) from None
    # IR versions before 4 required every initializer to be a graph input; the converter keeps the
    # old IR version, so raise it to the one the new opset needs.
    converted.ir_version = max(converted.ir_version, onnx.helper.find_min_ir_version_for(converted.opset_import))
    return converted


def _repair_shapes(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Make the file's shape annotations consistent (in place) and return a shape-inferred copy.

    Negative dimension values (paddle2onnx's -1 for "dynamic") become unknown dimensions. If onnx's
    inference finds an annotation contradicting what it infers, the intermediate annotations are stale
    (written before a converter rewrote the graph): they are dropped, and inference recomputes them.
    """
    graph = proto.graph
    for info in [*graph.input, *graph.output, *graph.value_info]:
        for dim in info.type.tensor_type.shape.dim:
            if dim.HasField("dim_value") and dim.dim_value < 0:
                dim.Clear()
    try:
        return onnx.shape_inference.infer_shapes(proto, strict_mode=True)
    except onnx.shape_inference.InferenceError as exc:
        # Only a contradiction with the annotations condemns them: for ops onnx has no schema for
        # (custom domains), the file's value_info may be the only shape information there is.
        if "existing" in str(exc):
            del graph.value_info[:]
    try:
        return onnx.shape_inference.infer_shapes(proto, strict_mode=False)
    except onnx.shape_inference.InferenceError:
        return proto  # custom ops onnx cannot read: the later passes infer what they can


def _check_weight_shapes(proto: onnx.ModelProto, source: str) -> None:
    """Refuse a layer whose constant weight does not fit its input's channels (the channel rules would
    link spaces of different sizes, and onnxruntime could not run the model either)."""
    graph = proto.graph
    shapes = {i.name: list(i.dims) for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            shapes[node.output[0]] = list(node.attribute[0].t.dims)
    for info in [*graph.input, *graph.value_info]:
        dims = info.type.tensor_type.shape.dim
        if info.type.tensor_type.HasField("shape") and info.name not in shapes:
            shapes[info.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    for node in graph.node:
        expected = _weight_channels(node, shapes)
        if expected is None:
            continue
        (data_axis, data_size), (weight_axis, weight_size) = expected
        if data_size is not None and weight_size is not None and data_size != weight_size:
            raise UnsupportedModelError(
                f"{source}: {node.op_type} node '{node.name or node.output[0]}': its input '{node.input[0]}' has "
                f"{data_size} channels (axis {data_axis}) but its weight '{node.input[1]}' expects {weight_size} "
                f"(axis {weight_axis}); the file is inconsistent: re-export or re-convert the model"
            )


def _weight_channels(node: onnx.NodeProto, shapes: dict[str, list[int | None]]) -> tuple | None:
    """((input axis, size), (weight axis, size it implies)) for the layers pcc prunes, or None."""
    if len(node.input) < 2 or node.domain not in ("", "ai.onnx"):
        return None
    x, w = shapes.get(node.input[0]), shapes.get(node.input[1])
    if not x or not w or len(w) < 2:
        return None
    group = next((a.i for a in node.attribute if a.name == "group"), 1)
    if node.op_type == "Conv" and len(x) > 1:
        return (1, x[1]), (1, w[1] * group)
    if node.op_type == "ConvTranspose" and len(x) > 1:
        return (1, x[1]), (0, w[0])
    if node.op_type == "MatMul" and len(x) >= 2:
        return (len(x) - 1, x[-1]), (len(w) - 2, w[-2])
    if node.op_type == "Gemm" and len(x) == 2 and len(w) == 2:
        a_k = 0 if next((a.i for a in node.attribute if a.name == "transA"), 0) else 1
        b_k = 1 if next((a.i for a in node.attribute if a.name == "transB"), 0) else 0
        return (a_k, x[a_k]), (b_k, w[b_k])
    return None


def _normalise(model: ir.Model) -> ir.Model:
    # Weights listed as graph inputs could be overridden by a caller, which would forbid pruning them;
    # modern exporters never do this, so treat them as the constants they are.
    common_passes.RemoveInitializersFromInputsPass()(model)
    common_passes.NameFixPass()(model)
    return model


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
