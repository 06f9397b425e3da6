"""A differentiable copy of an IR model: the ONNX graph run with torch ops, weights as `nn.Parameter`s.

Gradient-based importance (Taylor, Fisher) and recovery fine-tuning need the model in an autograd
framework. onnx2torch was tried and fails on what our exporter emits (ReduceMean-18, Reshape-19,
Gelu-20...) and on weights stored as Constant nodes (shared/DEPENDENCIES.md), so this is a small
interpreter of our own with the same discipline as the channel rules: one torch function per ONNX op in
one table, and an op with no entry is a clear error naming the op and node.

Every floating-point initializer becomes a parameter named like the initializer (BatchNorm running
statistics stay fixed buffers: fine-tuning runs BatchNorm in inference mode); `write_back` copies the
trained values into the IR, so the result is saved as ONNX by the usual backend.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir
import torch
import torch.nn.functional as F

from pcc.compiler.errors import UnsupportedModelError

__all__ = ["IRModule", "TORCH_OPS", "torch_step", "trainable_initializers"]

Tensor = torch.Tensor
OpFn = Callable[[list[Tensor | None], dict[str, Any]], list[Tensor] | Tensor]

_TORCH_DTYPES = {
    ir.DataType.FLOAT: torch.float32,
    ir.DataType.DOUBLE: torch.float64,
    ir.DataType.FLOAT16: torch.float16,
    ir.DataType.BFLOAT16: torch.bfloat16,
    ir.DataType.INT64: torch.int64,
    ir.DataType.INT32: torch.int32,
    ir.DataType.INT16: torch.int16,
    ir.DataType.INT8: torch.int8,
    ir.DataType.UINT8: torch.uint8,
    ir.DataType.BOOL: torch.bool,
}
_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_FLOAT_IR_TYPES = {t for t, torch_type in _TORCH_DTYPES.items() if torch_type in _FLOATS}


def _ints(t: Tensor | None) -> list[int] | None:
    return None if t is None else [int(v) for v in t.reshape(-1).tolist()]


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


# ------------------------------------------------------------------------------------------------
# convolution and linear


def _spatial_padding(x: Tensor, a: dict, kernel: Sequence[int], strides: Sequence[int], dilations: Sequence[int]):
    """ONNX pads (begin..., end...) or auto_pad, as an F.pad on x plus zero conv padding."""
    dims = len(kernel)
    auto = a.get("auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        pads_begin, pads_end = [], []
        for i in range(dims):
            size = x.shape[2 + i]
            out = math.ceil(size / strides[i])
            total = max((out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - size, 0)
            small, big = total // 2, total - total // 2
            pads_begin.append(small if auto == "SAME_UPPER" else big)
            pads_end.append(big if auto == "SAME_UPPER" else small)
    else:
        pads = a.get("pads", [0] * (2 * dims))
        pads_begin, pads_end = list(pads[:dims]), list(pads[dims:])
    if pads_begin == pads_end:
        return x, pads_begin
    flat = []
    for begin, end in zip(reversed(pads_begin), reversed(pads_end)):
        flat += [begin, end]
    return F.pad(x, flat), [0] * dims


def _conv(inputs, a):
    x, w = inputs[0], inputs[1]
    bias = inputs[2] if len(inputs) > 2 else None
    kernel = list(w.shape[2:])
    dims = len(kernel)
    strides = a.get("strides", [1] * dims)
    dilations = a.get("dilations", [1] * dims)
    x, padding = _spatial_padding(x, a, kernel, strides, dilations)
    conv = (F.conv1d, F.conv2d, F.conv3d)[dims - 1]
    return conv(x, w, bias, strides, padding, dilations, a.get("group", 1))


def _conv_transpose(inputs, a):
    x, w = inputs[0], inputs[1]
    bias = inputs[2] if len(inputs) > 2 else None
    dims = w.dim() - 2
    strides = a.get("strides", [1] * dims)
    dilations = a.get("dilations", [1] * dims)
    pads = a.get("pads", [0] * (2 * dims))
    if pads[:dims] != pads[dims:] or a.get("auto_pad", "NOTSET") != "NOTSET" or "output_shape" in a:
        raise NotImplementedError("ConvTranspose with asymmetric pads, auto_pad or output_shape")
    conv = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[dims - 1]
    return conv(x, w, bias, strides, pads[:dims], a.get("output_padding", [0] * dims), a.get("group", 1), dilations)


def _gemm(inputs, a):
    x, w = inputs[0], inputs[1]
    x = x.t() if a.get("transA", 0) else x
    w = w.t() if a.get("transB", 0) else w
    y = a.get("alpha", 1.0) * (x @ w)
    if len(inputs) > 2 and inputs[2] is not None:
        y = y + a.get("beta", 1.0) * inputs[2]
    return y


# ------------------------------------------------------------------------------------------------
# normalisation


def _batch_norm(inputs, a):
    x, scale, bias, mean, var = inputs[:5]
    momentum = a.get(_RECALIBRATE)
    if momentum is not None:  # normalise by the batch's statistics and fold them into the running ones
        return F.batch_norm(x, mean, var, scale, bias, training=True, momentum=momentum, eps=a.get("epsilon", 1e-5))
    return F.batch_norm(x, mean, var, scale, bias, training=False, eps=a.get("epsilon", 1e-5))


_RECALIBRATE = "__pcc_statistics_momentum"  # set on BatchNormalization attributes while re-estimating


def _layer_norm(inputs, a):
    x, scale = inputs[0], inputs[1]
    bias = inputs[2] if len(inputs) > 2 else None
    axis = _axis(a.get("axis", -1), x.dim())
    shape = tuple(x.shape[axis:])
    y = F.layer_norm(x, shape, eps=a.get("epsilon", 1e-5))
    y = y * scale
    return y + bias if bias is not None else y


def _group_norm(inputs, a):
    x, scale, bias = inputs
    groups = a["num_groups"]
    channels = x.shape[1]
    if scale.numel() != channels:  # opset 18: one scale per group
        scale = scale.repeat_interleave(channels // groups)
        bias = bias.repeat_interleave(channels // groups)
    return F.group_norm(x, groups, scale, bias, a.get("epsilon", 1e-5))


def _instance_norm(inputs, a):
    x, scale, bias = inputs
    return F.instance_norm(x, weight=scale, bias=bias, eps=a.get("epsilon", 1e-5))


def _lrn(inputs, a):
    return F.local_response_norm(inputs[0], a["size"], a.get("alpha", 1e-4), a.get("beta", 0.75), a.get("bias", 1.0))


def _softmax(fn):
    def op(inputs, a):
        return fn(inputs[0], dim=a.get("axis", -1))

    return op


# ------------------------------------------------------------------------------------------------
# pooling and reductions


def _pool_args(x: Tensor, a: dict):
    kernel = a["kernel_shape"]
    dims = len(kernel)
    strides = a.get("strides", [1] * dims)
    dilations = a.get("dilations", [1] * dims)
    x, padding = _spatial_padding(x, a, kernel, strides, dilations)
    return x, kernel, strides, padding, dilations


def _max_pool(inputs, a):
    x, kernel, strides, padding, dilations = _pool_args(inputs[0], a)
    pool = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[len(kernel) - 1]
    return pool(x, kernel, strides, padding, dilations, ceil_mode=bool(a.get("ceil_mode", 0)))


def _avg_pool(inputs, a):
    x, kernel, strides, padding, _ = _pool_args(inputs[0], a)
    pool = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[len(kernel) - 1]
    return pool(x, kernel, strides, padding, ceil_mode=bool(a.get("ceil_mode", 0)), count_include_pad=bool(a.get("count_include_pad", 0)))


def _global_pool(reduce):
    def op(inputs, a):
        x = inputs[0]
        return reduce(x, dim=tuple(range(2, x.dim())), keepdim=True)

    return op


def _reduce(fn):
    def op(inputs, a):
        x = inputs[0]
        axes = a.get("axes")
        if axes is None and len(inputs) > 1:
            axes = _ints(inputs[1])
        if not axes:
            if a.get("noop_with_empty_axes", 0):
                return x
            axes = list(range(x.dim()))
        return fn(x, [_axis(v, x.dim()) for v in axes], bool(a.get("keepdims", 1)))

    return op


def _reduce_max(x, dims, keep):
    return torch.amax(x, dim=dims, keepdim=keep)


def _reduce_min(x, dims, keep):
    return torch.amin(x, dim=dims, keepdim=keep)


def _reduce_prod(x, dims, keep):
    for d in sorted(dims, reverse=True):
        x = torch.prod(x, dim=d, keepdim=keep)
    return x


def _arg(fn):
    def op(inputs, a):
        return fn(inputs[0], dim=a.get("axis", 0), keepdim=bool(a.get("keepdims", 1)))

    return op


# ------------------------------------------------------------------------------------------------
# shape and data movement


def _reshape(inputs, a):
    x, shape = inputs[0], _ints(inputs[1])
    if not a.get("allowzero", 0):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


def _flatten(inputs, a):
    x = inputs[0]
    axis = _axis(a.get("axis", 1), x.dim())
    return x.reshape(int(np.prod(x.shape[:axis], dtype=np.int64)), -1)


def _concat(inputs, a):
    return torch.cat([t for t in inputs if t is not None], dim=a["axis"])


def _split(inputs, a):
    x = inputs[0]
    axis = _axis(a.get("axis", 0), x.dim())
    sizes = a.get("split") or (_ints(inputs[1]) if len(inputs) > 1 and inputs[1] is not None else None)
    if sizes is None:
        parts = a["num_outputs"]  # set from the node's output count when the model leaves it implicit
        chunk = math.ceil(x.shape[axis] / parts)
        sizes = [min(chunk, x.shape[axis] - i * chunk) for i in range(parts)]
    return list(torch.split(x, sizes, dim=axis))


def _slice(inputs, a):
    x = inputs[0]
    starts, ends = _ints(inputs[1]), _ints(inputs[2])
    axes = _ints(inputs[3]) if len(inputs) > 3 and inputs[3] is not None else list(range(len(starts)))
    steps = _ints(inputs[4]) if len(inputs) > 4 and inputs[4] is not None else [1] * len(starts)
    index: list[Any] = [slice(None)] * x.dim()
    flips = []
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis = _axis(axis, x.dim())
        size = x.shape[axis]
        if step > 0:
            start = min(max(start + size if start < 0 else start, 0), size)
            end = min(max(end + size if end < 0 else end, 0), size)
            index[axis] = slice(start, end, step)
        else:  # torch has no negative steps: slice the flipped axis
            start = min(max(start + size if start < 0 else start, -1), size - 1)
            end = min(max(end + size if end < 0 else end, -1), size - 1)
            index[axis] = slice(size - 1 - start, size - 1 - end, -step)
            flips.append(axis)
    if flips:
        x = torch.flip(x, flips)
    return x[tuple(index)]


def _gather(inputs, a):
    x, idx = inputs[0], inputs[1].long()
    axis = _axis(a.get("axis", 0), x.dim())
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    picked = x.index_select(axis, idx.reshape(-1))
    return picked.reshape(*x.shape[:axis], *idx.shape, *x.shape[axis + 1 :])


def _cum_sum(inputs, a):
    """ONNX CumSum: `exclusive` shifts by one (the first element is 0), `reverse` sums from the end."""
    x, axis = inputs[0], _axis(int(inputs[1].reshape(-1)[0]), inputs[0].dim())
    if a.get("reverse", 0):
        x = x.flip(axis)
    summed = torch.cumsum(x, dim=axis)
    if a.get("exclusive", 0):
        summed = summed - x
    return summed.flip(axis) if a.get("reverse", 0) else summed


def _gather_elements(inputs, a):
    x, idx = inputs[0], inputs[1].long()
    axis = _axis(a.get("axis", 0), x.dim())
    return torch.gather(x, axis, torch.where(idx < 0, idx + x.shape[axis], idx))


def _gather_nd(inputs, a):
    x, idx, batch_dims = inputs[0], inputs[1].long(), a.get("batch_dims", 0)
    lead = x.shape[:batch_dims]
    flat_x = x.reshape(-1, *x.shape[batch_dims:])
    flat_idx = idx.reshape(-1, *idx.shape[batch_dims:])
    depth = idx.shape[-1]
    picked = [flat_x[b][tuple(flat_idx[b][..., i] for i in range(depth))] for b in range(flat_x.shape[0])]
    return torch.stack(picked).reshape(*lead, *idx.shape[batch_dims:-1], *x.shape[batch_dims + depth :])


def _scatter_elements(inputs, a):
    x, idx, updates = inputs[0], inputs[1].long(), inputs[2]
    if a.get("reduction", "none") != "none":
        raise UnsupportedModelError(f"ScatterElements reduction {a['reduction']!r} has no torch counterpart here")
    axis = _axis(a.get("axis", 0), x.dim())
    return x.scatter(axis, torch.where(idx < 0, idx + x.shape[axis], idx), updates)


def _top_k(inputs, a):
    x, k = inputs[0], int(inputs[1].reshape(-1)[0])
    axis = _axis(a.get("axis", -1), x.dim())
    values, indices = torch.topk(x, k, dim=axis, largest=bool(a.get("largest", 1)), sorted=True)
    return [values, indices]


def _transpose(inputs, a):
    x = inputs[0]
    return x.permute(a.get("perm", list(reversed(range(x.dim())))))


def _squeeze(inputs, a):
    x = inputs[0]
    axes = a.get("axes") or (_ints(inputs[1]) if len(inputs) > 1 and inputs[1] is not None else None)
    if axes is None:
        return x.squeeze()
    for axis in sorted((_axis(v, x.dim()) for v in axes), reverse=True):
        x = x.squeeze(axis)
    return x


def _unsqueeze(inputs, a):
    x = inputs[0]
    axes = a.get("axes") or _ints(inputs[1])
    rank = x.dim() + len(axes)
    for axis in sorted(_axis(v, rank) for v in axes):
        x = x.unsqueeze(axis)
    return x


def _expand(inputs, a):
    x, shape = inputs[0], _ints(inputs[1])
    return x.expand(torch.broadcast_shapes(tuple(x.shape), tuple(shape)))


def _tile(inputs, a):
    return inputs[0].repeat(_ints(inputs[1]))


def _pad(inputs, a):
    x = inputs[0]
    pads = a.get("pads") or _ints(inputs[1])
    value = inputs[2].item() if len(inputs) > 2 and inputs[2] is not None and inputs[2].numel() else 0.0
    axes = _ints(inputs[3]) if len(inputs) > 3 and inputs[3] is not None else list(range(x.dim()))
    axes = [_axis(v, x.dim()) for v in axes]
    begin = dict(zip(axes, pads[: len(axes)]))
    end = dict(zip(axes, pads[len(axes) :]))
    flat = []
    for axis in reversed(range(x.dim())):
        flat += [begin.get(axis, 0), end.get(axis, 0)]
    mode = {"constant": "constant", "reflect": "reflect", "edge": "replicate"}[a.get("mode", "constant")]
    return F.pad(x, flat, mode=mode, value=value) if mode == "constant" else F.pad(x, flat, mode=mode)


def _resize(inputs, a):
    x = inputs[0]
    scales = inputs[2] if len(inputs) > 2 else None
    sizes = _ints(inputs[3]) if len(inputs) > 3 and inputs[3] is not None else None
    if sizes is None:
        sizes = [int(math.floor(d * s)) for d, s in zip(x.shape, scales.tolist())]
    if sizes[:2] != list(x.shape[:2]):
        raise NotImplementedError("Resize of the batch or channel axis")
    mode = a.get("mode", "nearest")
    transform = a.get("coordinate_transformation_mode", "half_pixel")
    if mode == "nearest" and transform == "asymmetric" and a.get("nearest_mode", "round_prefer_floor") == "floor":
        return F.interpolate(x, size=sizes[2:], mode="nearest")
    if mode == "linear" and transform in ("half_pixel", "pytorch_half_pixel", "align_corners"):
        kind = {3: "linear", 4: "bilinear", 5: "trilinear"}[x.dim()]
        return F.interpolate(x, size=sizes[2:], mode=kind, align_corners=transform == "align_corners")
    raise NotImplementedError(f"Resize mode={mode} coordinate_transformation_mode={transform}")


def _depth_to_space(inputs, a):
    x = inputs[0]
    b = a["blocksize"]
    n, c, h, w = x.shape
    if a.get("mode", "DCR") == "CRD":
        return F.pixel_shuffle(x, b)
    return x.reshape(n, b, b, c // (b * b), h, w).permute(0, 3, 4, 1, 5, 2).reshape(n, c // (b * b), h * b, w * b)


def _space_to_depth(inputs, a):
    x = inputs[0]
    b = a["blocksize"]
    n, c, h, w = x.shape
    return x.reshape(n, c, h // b, b, w // b, b).permute(0, 3, 5, 1, 2, 4).reshape(n, c * b * b, h // b, w // b)


def _shape(inputs, a):
    shape = list(inputs[0].shape)
    start, end = a.get("start", 0), a.get("end", len(shape))
    return torch.tensor(shape[start:end], dtype=torch.int64)


def _constant(inputs, a):
    return a["value"]


def _constant_of_shape(inputs, a):
    value = a.get("value", torch.zeros(1))
    return torch.full(_ints(inputs[0]), value.reshape(-1)[0].item(), dtype=value.dtype)


def _range(inputs, a):
    start, limit, delta = (t.item() for t in inputs)
    return torch.arange(start, limit, delta, dtype=inputs[0].dtype)


def _cast(inputs, a):
    return inputs[0].to(_TORCH_DTYPES[ir.DataType(a["to"])])


# ------------------------------------------------------------------------------------------------
# element-wise


def _div(inputs, a):
    x, y = inputs
    if x.dtype in _FLOATS:
        return x / y
    return torch.div(x, y, rounding_mode="trunc")


def _clip(inputs, a):
    x = inputs[0]
    low = inputs[1] if len(inputs) > 1 and inputs[1] is not None else a.get("min")
    high = inputs[2] if len(inputs) > 2 and inputs[2] is not None else a.get("max")
    return torch.clamp(x, low, high)


def _hard_sigmoid(inputs, a):
    return torch.clamp(a.get("alpha", 0.2) * inputs[0] + a.get("beta", 0.5), 0.0, 1.0)


def _gelu(inputs, a):
    return F.gelu(inputs[0], approximate="tanh" if a.get("approximate", "none") == "tanh" else "none")


def _variadic(fn):
    def op(inputs, a):
        result = inputs[0]
        for t in inputs[1:]:
            result = fn(result, t)
        return result

    return op


def _mean(inputs, a):
    return _variadic(torch.add)(inputs, a) / len(inputs)


def _unary(fn):
    return lambda inputs, a: fn(inputs[0])


def _binary(fn):
    return lambda inputs, a: fn(inputs[0], inputs[1])


def _dropout(inputs, a):
    x = inputs[0]
    return [x, torch.ones_like(x, dtype=torch.bool)]


TORCH_OPS: dict[str, OpFn] = {
    "Conv": _conv,
    "ConvTranspose": _conv_transpose,
    "Gemm": _gemm,
    "MatMul": _binary(torch.matmul),
    "BatchNormalization": _batch_norm,
    "LayerNormalization": _layer_norm,
    "GroupNormalization": _group_norm,
    "InstanceNormalization": _instance_norm,
    "LRN": _lrn,
    "Softmax": _softmax(torch.softmax),
    "LogSoftmax": _softmax(torch.log_softmax),
    "MaxPool": _max_pool,
    "AveragePool": _avg_pool,
    "GlobalAveragePool": _global_pool(torch.mean),
    "GlobalMaxPool": _global_pool(torch.amax),
    "ReduceMean": _reduce(lambda x, d, k: torch.mean(x, dim=d, keepdim=k)),
    "ReduceSum": _reduce(lambda x, d, k: torch.sum(x, dim=d, keepdim=k)),
    "ReduceMax": _reduce(_reduce_max),
    "ReduceMin": _reduce(_reduce_min),
    "ReduceProd": _reduce(_reduce_prod),
    "ReduceL2": _reduce(lambda x, d, k: torch.sqrt(torch.sum(x * x, dim=d, keepdim=k))),
    "ReduceL1": _reduce(lambda x, d, k: torch.sum(torch.abs(x), dim=d, keepdim=k)),
    "ReduceSumSquare": _reduce(lambda x, d, k: torch.sum(x * x, dim=d, keepdim=k)),
    "ReduceLogSumExp": _reduce(lambda x, d, k: torch.logsumexp(x, dim=d, keepdim=k)),
    "ArgMax": _arg(torch.argmax),
    "ArgMin": _arg(torch.argmin),
    "Reshape": _reshape,
    "Flatten": _flatten,
    "Concat": _concat,
    "Slice": _slice,
    "Split": _split,
    "Gather": _gather,
    "GatherElements": _gather_elements,
    "CumSum": _cum_sum,
    "GatherND": _gather_nd,
    "ScatterElements": _scatter_elements,
    "TopK": _top_k,
    "Transpose": _transpose,
    "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze,
    "Expand": _expand,
    "Tile": _tile,
    "Pad": _pad,
    "Resize": _resize,
    "DepthToSpace": _depth_to_space,
    "SpaceToDepth": _space_to_depth,
    "Shape": _shape,
    "Size": lambda inputs, a: torch.tensor(inputs[0].numel(), dtype=torch.int64),
    "Constant": _constant,
    "ConstantOfShape": _constant_of_shape,
    "Range": _range,
    "Cast": _cast,
    "CastLike": lambda inputs, a: inputs[0].to(inputs[1].dtype),
    "Identity": _unary(lambda x: x),
    "Dropout": _dropout,
    "Add": _binary(torch.add),
    "Sub": _binary(torch.sub),
    "Mul": _binary(torch.mul),
    "Div": _div,
    "Pow": _binary(torch.pow),
    "Max": _variadic(torch.maximum),
    "Min": _variadic(torch.minimum),
    "Sum": _variadic(torch.add),
    "Mean": _mean,
    "Where": lambda inputs, a: torch.where(inputs[0], inputs[1], inputs[2]),
    "Equal": _binary(torch.eq),
    "Less": _binary(torch.lt),
    "LessOrEqual": _binary(torch.le),
    "Greater": _binary(torch.gt),
    "GreaterOrEqual": _binary(torch.ge),
    "And": _binary(torch.logical_and),
    "Or": _binary(torch.logical_or),
    "Xor": _binary(torch.logical_xor),
    "Not": _unary(torch.logical_not),
    "Relu": _unary(F.relu),
    "Sigmoid": _unary(torch.sigmoid),
    "Tanh": _unary(torch.tanh),
    "Exp": _unary(torch.exp),
    "Log": _unary(torch.log),
    "Sqrt": _unary(torch.sqrt),
    "Abs": _unary(torch.abs),
    "Neg": _unary(torch.neg),
    "Reciprocal": _unary(torch.reciprocal),
    "Erf": _unary(torch.erf),
    "Floor": _unary(torch.floor),
    "Ceil": _unary(torch.ceil),
    "Round": _unary(torch.round),
    "Sign": _unary(torch.sign),
    "Sin": _unary(torch.sin),
    "Cos": _unary(torch.cos),
    "Softplus": _unary(F.softplus),
    "Softsign": _unary(F.softsign),
    "Mish": _unary(F.mish),
    "HardSwish": _unary(F.hardswish),
    "HardSigmoid": _hard_sigmoid,
    "Gelu": _gelu,
    "Clip": _clip,
    "LeakyRelu": lambda inputs, a: F.leaky_relu(inputs[0], a.get("alpha", 0.01)),
    "Elu": lambda inputs, a: F.elu(inputs[0], a.get("alpha", 1.0)),
    "Celu": lambda inputs, a: F.celu(inputs[0], a.get("alpha", 1.0)),
    "Selu": _unary(F.selu),
    "PRelu": lambda inputs, a: torch.where(inputs[0] >= 0, inputs[0], inputs[0] * inputs[1]),
    "Einsum": lambda inputs, a: torch.einsum(a["equation"], *inputs),
    "IsNaN": _unary(torch.isnan),
    "IsInf": _unary(torch.isinf),
}


def _attribute(attr: ir.Attr) -> Any:
    value = attr.value
    if attr.type == ir.AttributeType.TENSOR:
        return torch.from_numpy(np.array(value.numpy()))
    if attr.type in (ir.AttributeType.INTS, ir.AttributeType.FLOATS, ir.AttributeType.STRINGS):
        return list(value)
    return value


def torch_step(node: ir.Node) -> tuple[OpFn, dict[str, Any]]:
    """The torch function that runs `node`, and the node's attributes as that function reads them.

    For passes that walk a graph node by node themselves (layer-wise reconstruction) instead of
    running it whole through `IRModule`.
    """
    if node.domain not in ("", "ai.onnx") or node.op_type not in TORCH_OPS:
        raise UnsupportedModelError(
            f"no torch implementation of op {node.op_type} (node '{node.name}') for the differentiable copy"
        )
    attrs = {k: _attribute(v) for k, v in node.attributes.items()}
    if node.op_type == "Split":
        attrs.setdefault("num_outputs", len(node.outputs))
    return TORCH_OPS[node.op_type], attrs


class IRModule(torch.nn.Module):
    """Runs an IR graph with torch; weights are parameters named like their initializers.

    `forward(feeds)` takes a mapping of input name to tensor and returns the outputs in graph order;
    `run(feeds, capture)` also returns the intermediate values named in `capture`.
    """

    def __init__(self, model: ir.Model) -> None:
        super().__init__()
        graph = model.graph
        self.input_names = [v.name for v in graph.inputs]
        self.output_names = [v.name for v in graph.outputs]
        self._param_index: dict[str, int] = {}
        self._constants: dict[str, Tensor] = {}
        self.weights = torch.nn.ParameterList()
        frozen = _statistics_inputs(graph)
        self._statistics = sorted(frozen & set(graph.initializers))
        trainable = set(trainable_initializers(model))
        for name, value in graph.initializers.items():
            tensor = torch.from_numpy(np.array(value.const_value.numpy()))
            if name in trainable:
                self._param_index[name] = len(self.weights)
                self.weights.append(torch.nn.Parameter(tensor))
            else:
                self._constants[name] = tensor
        self._program = []
        for node in graph:
            fn, attrs = torch_step(node)
            inputs = [v.name if v is not None else None for v in node.inputs]
            outputs = [v.name for v in node.outputs]
            self._program.append((node, fn, inputs, outputs, attrs))

    def named_weights(self) -> Iterable[tuple[str, torch.nn.Parameter]]:
        """(initializer name, parameter) pairs."""
        for name, index in self._param_index.items():
            yield name, self.weights[index]

    def weight(self, name: str) -> torch.nn.Parameter:
        return self.weights[self._param_index[name]]

    def forward(self, feeds: Mapping[str, Tensor | np.ndarray], weights: Mapping[str, Tensor] | None = None) -> list[Tensor]:
        return self.run(feeds, weights=weights)[0]

    def run(
        self, feeds: Mapping[str, Tensor | np.ndarray], capture: Iterable[str] = (),
        weights: Mapping[str, Tensor] | None = None,
    ) -> tuple[list[Tensor], dict[str, Tensor]]:
        """`weights` replaces parameters by name for this call (tensors computed elsewhere, such as a
        metanetwork's output, so gradients flow into whatever produced them)."""
        env: dict[str, Tensor] = dict(self._constants)
        for name, index in self._param_index.items():
            env[name] = self.weights[index]
        env.update(weights or {})
        for name in self.input_names:
            if name not in feeds:
                raise ValueError(f"missing input '{name}'")
            value = feeds[name]
            env[name] = value if isinstance(value, Tensor) else torch.from_numpy(np.asarray(value))
        for node, fn, inputs, outputs, attrs in self._program:
            args = [env[name] if name is not None else None for name in inputs]
            try:
                result = fn(args, attrs)
            except NotImplementedError as exc:
                raise UnsupportedModelError(f"{node.op_type} node '{node.name}': {exc} is not supported") from None
            results = result if isinstance(result, list) else [result]
            for name, value in zip(outputs, results):
                env[name] = value
        captured = {name: env[name] for name in capture}
        return [env[name] for name in self.output_names], captured

    @torch.no_grad()
    def recalibrate_batchnorm(self, batches: Iterable[Mapping[str, Tensor | np.ndarray]]) -> int:
        """Re-estimate every BatchNorm's running mean and variance as the average over `batches`.

        Each batch is normalised by its own statistics (train-mode BatchNorm), as the layers after a
        pruned one see it, and batch k enters the running values with weight 1/k, so the result is the
        plain mean over batches. Returns the number of batches seen.
        """
        norms = [attrs for node, _, _, _, attrs in self._program if node.op_type == "BatchNormalization"]
        seen = 0
        try:
            for seen, feeds in enumerate(batches, start=1):
                for attrs in norms:
                    attrs[_RECALIBRATE] = 1.0 / seen
                self.run(feeds)
        finally:
            for attrs in norms:
                attrs.pop(_RECALIBRATE, None)
        return seen

    @torch.no_grad()
    def write_back(self, model: ir.Model) -> None:
        """Copy the current parameter values and BatchNorm statistics into `model`'s initializers."""
        current = [(name, param.detach()) for name, param in self.named_weights()]
        current += [(name, self._constants[name]) for name in self._statistics]
        for name, tensor in current:
            value = model.graph.initializers[name]
            array = tensor.cpu().numpy().astype(value.const_value.numpy().dtype, copy=True)
            value.const_value = ir.tensor(array, name=name)


def trainable_initializers(model: ir.Model) -> list[str]:
    """The initializers `IRModule` makes parameters: floating point, not BatchNorm statistics."""
    frozen = _statistics_inputs(model.graph)
    return [
        name for name, value in model.graph.initializers.items()
        if name not in frozen and value.const_value is not None and value.const_value.dtype in _FLOAT_IR_TYPES
    ]


def _statistics_inputs(graph: ir.Graph) -> set[str]:
    """BatchNorm running mean and variance: statistics, not trainable weights."""
    names = set()
    for node in graph:
        if node.op_type == "BatchNormalization":
            names.update(v.name for v in node.inputs[3:5] if v is not None)
    return names
