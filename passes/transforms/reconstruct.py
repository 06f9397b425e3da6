"""Reconstruct: re-fit the layers after removed units so the pruned model's activations match the dense one's.

Re-estimating BatchNorm statistics repairs a pruned model only where BatchNorm survived, and the default
`torch.onnx.export(dynamo=True)` folds it into the convolutions; one-shot pruning then leaves each layer
after a pruned one summing fewer inputs than it was trained on. Reconstruction fits what remains on
calibration data instead, layer by layer in topological order: each layer is fed the *pruned* model's
inputs (after the layers before it were re-fitted, so errors do not pile up) and aims at the *dense*
model's outputs (from `KeepDenseReference`).

Which layers: Conv, Gemm and MatMul with a constant weight whose inputs were reduced (the consumers of
pruned channel and head groups) or whose weights were zeroed (`SparsifyWeights`), each with its bias (a
Conv/Gemm input, or the Add after a MatMul). The modes:

- `ls`: ridge least squares over the weight and bias, min ||W' x + b' − y_dense||² + λ||W'||² (ThiNet,
  He et al. 2017's channel-pruning reconstruction), from Σ x̃ x̃ᵀ and Σ x̃ yᵀ (x̃ = [x, 1]; convolutions as
  im2col patches) accumulated over the calibration batches and solved in float64; λ is `ridge` times the
  mean diagonal of Σ x xᵀ; a convolution seeing more than `max_rows` positions in all is fitted on a random
  share of them. A layer without a bias gets one. Sparse layers then go through SparseGPT's
  update (`sparsegpt.py`) from that solution with the same Hessian, so the zeros stay where they are.
  Grouped and depthwise convolutions get the bias fit only.
- `bias`: only the bias moves, by the mean of (dense output − pruned output) per output channel: FLAP's
  bias compensation (b += W[:, removed] · E[x_removed]) when the kept inputs are unchanged, and it also
  absorbs the mean shift that earlier pruning left in the kept inputs.

Least squares holds every fifth calibration sample out: the ridge is the one of λ × 10^k that fits those
samples best, and a fit that no ridge makes better there than the pruned weights is declined, so a layer
with fewer rows than inputs (a classifier after global pooling) is not fitted to the calibration set.
The held-out samples come from the same data as the rest: they do not see a shift to other data. On
EfficientNet-Lite0 at 30% (DP widths; calibration crops of a few photos, evaluation crops of others) the
calibration output KL fell from 1.94 to 0.0063 while top-1 agreement fell from 38.3% to 23.1% without
held-out samples and to 19.5% with them. A fit that does not lower the
layer's error on the calibration data is not applied either, and where the fits together make the
model's output further from the dense one's on the calibration data, they are all undone. The graph is walked
once, node by node over every calibration batch at once, each value freed after its last use; the dense
reference walks in lockstep up to the node being fitted. Where a BatchNorm follows a re-fitted Conv, the
target is the dense Conv's output, so the BatchNorm's statistics stay right.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
import torch

from pcc.compiler.calibration import CalibrationData
from pcc.compiler.errors import InvalidRequestError
from pcc.compiler.options import RECONSTRUCT_MODES
from pcc.compiler.torch_module import TORCH_OPS, torch_step
from pcc.passes.analysis.dense_reference import DenseReference
from pcc.passes.analysis.dependency_groups import is_parameter
from pcc.passes.results import fetch, store
from pcc.passes.transforms.sparsegpt import sparsegpt_update

__all__ = ["Reconstruct", "ReconstructionReport", "LayerFit", "reconstruct", "RECONSTRUCTION_METHODS"]

Tensor = torch.Tensor
RECONSTRUCTION_METHODS = tuple(mode for mode in RECONSTRUCT_MODES if mode != "none")
_CHUNK_ELEMENTS = 1 << 22  # im2col patches are built this many elements at a time
# rows a least-squares fit accumulates at most: on the ResConcat CNN at 50% (its 3x3 convolutions see 401k
# positions on 512 images) a random 32k of them gave 91.39% test top-1 against 91.43% from all
DEFAULT_MAX_ROWS = 1 << 15
_HOLD_OUT_EVERY = 5  # every fifth calibration sample checks the least-squares fits instead of feeding them
_RIDGE_STEPS = (-1, 0, 1, 2, 3)  # ridge × 10^k tried on the held-out samples
_MIN_HELD_OUT = 8  # fewer held-out samples choose a ridge by chance: then every sample fits, with the given ridge


@dataclass
class LayerFit:
    """One re-fitted layer: its error ||y − y_dense||² / ||y_dense||² on the calibration data before and after."""

    node: str
    op_type: str
    method: str  # ls | sparsegpt | bias
    error_before: float
    error_after: float
    rows: int  # rows of the fit: samples times output positions
    applied: bool = True  # False: the fit did not lower the error, the layer was left as it was
    ridge: float | None = None  # least squares: the ridge it used (chosen on held-out samples where there are enough)
    declined: str = ""  # why a fit was not applied

    def row(self) -> str:
        note = f"  (not applied: {self.declined})" if not self.applied else ""
        ridge = f"{self.ridge:8.0e}" if self.ridge is not None else " " * 8
        return (f"  {self.node:<40} {self.op_type:<7} {self.method:<9} {self.error_before:10.4g} -> "
                f"{self.error_after:<10.4g} {self.rows:>9} {ridge}{note}")


@dataclass
class ReconstructionReport:
    """What `Reconstruct` did: per layer, the error against the dense model before and after."""

    META_KEY = "pcc.reconstruction"
    PRODUCED_BY = "Reconstruct"

    mode: str
    seconds: float
    samples: int
    layers: list[LayerFit] = field(default_factory=list)
    # the model's first output against the dense model's, on the calibration data, before and after the fits
    output_distortion: tuple[float, float] | None = None
    reverted: bool = False  # the fits made that output worse, so the model was left as pruned

    def summary(self) -> str:
        if not self.layers:
            return f"{self.mode}: nothing to re-fit (no layer lost inputs or weights)"
        before = float(np.mean([f.error_before for f in self.layers]))
        after = float(np.mean([f.error_after for f in self.layers]))
        applied = sum(f.applied for f in self.layers)
        text = (f"{self.mode}: {applied}/{len(self.layers)} layers re-fitted on {self.samples} samples in "
                f"{self.seconds:.1f} s; error vs dense, mean over layers {before:.3g} -> {after:.3g}")
        if self.output_distortion is not None:
            text += f"; output distortion {self.output_distortion[0]:.4g} -> {self.output_distortion[1]:.4g}"
        if self.reverted:
            text += ": worse, so the fits were undone (the model stays as pruned)"
        return text

    def table(self) -> str:
        head = f"  {'layer':<40} {'op':<7} {'method':<9} {'error before':>10}    {'after':<10} {'rows':>9} {'ridge':>8}"
        return "\n".join([head, *(f.row() for f in self.layers)])


# ------------------------------------------------------------------------------------------------
# layers


@dataclass
class _Layer:
    """A linear layer y = W x + b seen as a matrix W [outputs, features] and a bias vector b [outputs]."""

    node: ir.Node
    weight: ir.Value
    out_axis: int  # of the stored weight
    in_axis: int
    bias: ir.Value | None  # Conv/Gemm's bias input, or the constant of the Add after a MatMul
    bias_after: bool  # the bias is added by a separate Add (MatMul): not part of the node's output
    scale: float = 1.0  # Gemm alpha
    bias_scale: float = 1.0  # Gemm beta
    attrs: dict = field(default_factory=dict)

    @property
    def op_type(self) -> str:
        return self.node.op_type

    @property
    def groups(self) -> int:
        return int(self.attrs.get("group", 1)) if self.op_type == "Conv" else 1

    @property
    def channel_axis(self) -> int:
        """The outputs' axis in the node's output activation."""
        return 1 if self.op_type == "Conv" else -1

    @property
    def takes_bias(self) -> bool:
        return self.bias_scale != 0

    def stored_weight(self) -> Tensor:
        return torch.from_numpy(np.array(self.weight.const_value.numpy()))

    def stored_bias(self) -> Tensor | None:
        return None if self.bias is None else torch.from_numpy(np.array(self.bias.const_value.numpy())).reshape(-1)

    def matrix(self, stored: Tensor) -> Tensor:
        """[outputs, features], the scale folded in; features of a Conv ordered as its weight (c, kh, kw)."""
        m = stored.reshape(stored.shape[0], -1) if self.op_type == "Conv" else (stored if self.out_axis == 0 else stored.T)
        return self.scale * m

    def stored_from(self, matrix: Tensor) -> Tensor:
        m = matrix / self.scale
        shape = tuple(self.weight.const_value.shape)
        return m.reshape(shape) if self.op_type == "Conv" else (m if self.out_axis == 0 else m.T).contiguous()

    def bias_vector(self, stored: Tensor | None, outputs: int, dtype) -> Tensor:
        return torch.zeros(outputs, dtype=dtype) if stored is None else self.bias_scale * stored.to(dtype)

    def node_output(self, x: Tensor, matrix: Tensor, bias: Tensor) -> Tensor:
        """What the node computes from input `x` with these parameters (a MatMul's output excludes its Add)."""
        add = None if self.bias_after else bias
        if self.op_type == "Conv":
            stored = self.stored_from(matrix).to(x.dtype)
            return TORCH_OPS["Conv"]([x, stored, None if add is None else add.to(x.dtype)], self.attrs)
        y = x @ matrix.T.to(x.dtype)
        return y if add is None else y + add.to(x.dtype)

    def complete(self, node_output: Tensor, bias: Tensor) -> Tensor:
        """The layer's output with its bias: the node's output, plus the bias a separate Add puts on."""
        return node_output + bias.to(node_output.dtype) if self.bias_after else node_output

    def rows(self, y: Tensor) -> Tensor:
        """An output activation as [positions, outputs]."""
        return y.movedim(1, -1).reshape(-1, y.shape[1]) if self.op_type == "Conv" else y.reshape(-1, y.shape[-1])

    def features(self, x: Tensor, features: int) -> Sequence[Tensor]:
        """The layer's input as rows [positions, features], in chunks: im2col patches for a Conv, taken with
        the Conv's own padding, stride and dilation by a grouped convolution with one-hot kernels."""
        if self.op_type != "Conv":
            return [x.reshape(-1, features)]
        kernel = tuple(self.weight.const_value.shape[2:])
        taps = int(np.prod(kernel))
        channels = x.shape[1]
        one_hot = torch.eye(taps, dtype=x.dtype).reshape(taps, 1, *kernel).repeat(channels, 1, *([1] * len(kernel)))
        attrs = {**self.attrs, "group": channels}
        positions = int(np.prod(x.shape[2:]))
        step = max(1, _CHUNK_ELEMENTS // max(1, features * positions))
        return [
            self.rows(TORCH_OPS["Conv"]([x[i : i + step], one_hot], attrs))
            for i in range(0, x.shape[0], step)
        ]


def _single_use_parameter(value: ir.Value | None) -> bool:
    return value is not None and is_parameter(value) and len(value.uses()) == 1


def _constant_vector(value: ir.Value | None, size: int) -> bool:
    """A constant that adds one value per output (shape [size], [1, size], ...)."""
    if value is None or value.const_value is None:
        return False
    shape = tuple(value.const_value.shape)
    return int(np.prod(shape)) == size and (not shape or shape[-1] == size)


def _describe(node: ir.Node) -> _Layer | None:
    """The node as a linear layer with a constant weight only it uses, or None."""
    if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.inputs) < 2:
        return None
    weight = node.inputs[1]
    if not _single_use_parameter(weight):
        return None
    shape = tuple(weight.const_value.shape)
    attrs = torch_step(node)[1]
    if node.op_type == "Conv":
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        if bias is not None and not (_single_use_parameter(bias) and _constant_vector(bias, shape[0])):
            return None
        return _Layer(node, weight, 0, 1, bias, False, attrs=attrs)
    if len(shape) != 2:
        return None
    if node.op_type == "Gemm":
        if attrs.get("transA", 0):
            return None
        out_axis = 0 if attrs.get("transB", 0) else 1
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        if bias is not None and not (_single_use_parameter(bias) and _constant_vector(bias, shape[out_axis])):
            return None
        return _Layer(node, weight, out_axis, 1 - out_axis, bias, False, float(attrs.get("alpha", 1.0)),
                      float(attrs.get("beta", 1.0)), attrs)
    output = node.outputs[0]
    uses = output.uses()
    add = uses[0][0] if len(uses) == 1 and uses[0][0].op_type == "Add" and output not in node.graph.outputs else None
    bias = add.inputs[1 - uses[0][1]] if add is not None else None
    if not (_single_use_parameter(bias) and _constant_vector(bias, shape[1])):
        bias = None
    return _Layer(node, weight, 1, 0, bias, True, attrs=attrs)


@dataclass
class _Planned:
    """A layer to re-fit and where its outputs are in the dense model."""

    layer: _Layer
    dense: _Layer
    kept_outputs: np.ndarray  # dense output index of each pruned output
    sparse: bool  # its weights were zeroed (SparsifyWeights): keep that mask


def _plan(model: ir.Model, reference: DenseReference) -> dict[str, _Planned]:
    """The layers whose inputs were reduced or whose weights were zeroed since the reference was kept."""
    dense_nodes = {node.name: node for node in reference.model.graph}
    plan = {}
    for node in model.graph:
        layer = _describe(node)
        dense_node = dense_nodes.get(node.name)
        dense = _describe(dense_node) if dense_node is not None and dense_node.op_type == node.op_type else None
        if layer is None or dense is None or layer.out_axis != dense.out_axis:
            continue
        pruned_w = layer.weight.const_value.numpy()
        dense_w = dense.weight.const_value.numpy()
        restricted = dense_w
        for axis in (layer.out_axis, layer.in_axis):
            if pruned_w.shape[axis] != dense_w.shape[axis] and (layer.weight.name, axis) not in reference.kept:
                raise ir.passes.PreconditionError(
                    f"{node.op_type} node '{node.name}' lost channels that the dense reference cannot place: "
                    "run RecordKeptChannels right before PruneChannels"
                )
            restricted = np.take(restricted, reference.kept_along(layer.weight.name, axis, pruned_w.shape[axis]), axis=axis)
        reduced = pruned_w.shape[layer.in_axis] < dense_w.shape[layer.in_axis]
        sparse = bool(((pruned_w == 0) & (restricted != 0)).any())
        if reduced or sparse:
            kept = reference.kept_along(layer.weight.name, layer.out_axis, pruned_w.shape[layer.out_axis])
            plan[node.name] = _Planned(layer, dense, kept, sparse)
    return plan


# ------------------------------------------------------------------------------------------------
# walking a graph over all calibration batches


class _Walk:
    """Runs a graph node by node over every calibration batch at once, each value freed after its last
    use (except the outputs of `pinned` nodes, kept until taken)."""

    def __init__(self, model: ir.Model, batches: list[dict[str, Tensor]], pinned: set[str] = frozenset()) -> None:
        graph = model.graph
        self.nodes = list(graph)
        self.steps = [torch_step(node) for node in self.nodes]
        self.constants = {
            name: torch.from_numpy(np.array(value.const_value.numpy()))
            for name, value in graph.initializers.items() if value.const_value is not None
        }
        self.values: dict[str, list[Tensor]] = {v.name: [b[v.name] for b in batches] for v in graph.inputs}
        self.count = len(batches)
        self.position = 0
        self._index = {node.name: i for i, node in enumerate(self.nodes)}
        self._pinned = {v.name for node in self.nodes if node.name in pinned for v in node.outputs}
        self._last: dict[str, int] = {}
        for i, node in enumerate(self.nodes):
            self._last.update((v.name, i) for v in node.inputs if v is not None)
        self._frees: list[list[str]] = [[] for _ in self.nodes]
        for name, i in self._last.items():
            self._frees[i].append(name)

    def get(self, name: str) -> list[Tensor]:
        if name in self.values:
            return self.values[name]
        return [self.constants[name]] * self.count

    def execute(self, index: int, outputs: list[Tensor] | None = None) -> None:
        """Run node `index` on every batch (or take its first output's per-batch values as given)."""
        node = self.nodes[index]
        fn, attrs = self.steps[index]
        if outputs is not None:
            self.values[node.outputs[0].name] = outputs
        else:
            names = [v.name if v is not None else None for v in node.inputs]
            per_input = [self.get(n) if n is not None else [None] * self.count for n in names]
            results = [fn(list(args), attrs) for args in zip(*per_input)] if per_input else [fn([], attrs)] * self.count
            for k, value in enumerate(node.outputs):
                self.values[value.name] = [r[k] if isinstance(r, list) else r for r in results]
        for name in self._frees[index]:
            if name not in self._pinned:
                self.values.pop(name, None)
        self.position = index + 1

    def run_through(self, name: str) -> ir.Node | None:
        """Run up to and including the node called `name`; that node (None if the graph has none)."""
        index = self._index.get(name)
        if index is None:
            return None
        while self.position <= index:
            self.execute(self.position)
        return self.nodes[index]

    def take(self, name: str) -> list[Tensor]:
        """A pinned value, unpinned: freed now if nothing still to run reads it."""
        values = self.values[name]
        self._pinned.discard(name)
        if self._last.get(name, -1) < self.position:
            del self.values[name]
        return values


# ------------------------------------------------------------------------------------------------
# fitting


def _relative_error(outputs: list[Tensor], targets: list[Tensor]) -> float:
    # summed in the activations' precision (torch's cascade sum is as close as float64 here): casting whole
    # activations to float64 first took a third of a reconstruction's time
    num = sum(float(torch.square(y - t).sum()) for y, t in zip(outputs, targets))
    den = sum(float(torch.square(t).sum()) for t in targets)
    return num / den if den > 0 else num


class _Moments:
    """Σ x̃ x̃ᵀ and Σ x̃ yᵀ of one set of rows (x̃ = [x, 1] when the layer takes a bias), in float64."""

    def __init__(self, features: int, outputs: int, with_bias: bool) -> None:
        self.features, self.with_bias = features, with_bias
        width = features + with_bias
        self.xx = torch.zeros(width, width, dtype=torch.float64)
        self.xy = torch.zeros(width, outputs, dtype=torch.float64)
        self.rows = 0

    def add(self, x: Tensor, t: Tensor) -> None:
        x, t, f = x.double(), t.double(), self.features
        self.xx[:f, :f] += x.T @ x
        self.xy[:f] += x.T @ t
        if self.with_bias:  # the column of ones, without building it
            sums = x.sum(0)
            self.xx[:f, f] += sums
            self.xx[f, :f] += sums
            self.xx[f, f] += x.shape[0]
            self.xy[f] += t.sum(0)
        self.rows += x.shape[0]

    def __add__(self, other: _Moments) -> _Moments:
        total = _Moments(self.features, self.xy.shape[1], self.with_bias)
        total.xx, total.xy, total.rows = self.xx + other.xx, self.xy + other.xy, self.rows + other.rows
        return total

    def regularised(self, ridge: float) -> Tensor:
        """Σ x̃ x̃ᵀ with λ = `ridge` × its mean feature diagonal added to the features' diagonal (not the bias's)."""
        xx = self.xx.clone()
        if self.features:
            torch.diagonal(xx)[: self.features] += ridge * float(torch.diagonal(self.xx)[: self.features].mean())
        return xx

    def solve(self, ridge: float) -> tuple[Tensor, Tensor]:
        """The ridge solution [outputs, width] and the regularised Σ x̃ x̃ᵀ it came from."""
        xx = self.regularised(ridge)
        factor, info = torch.linalg.cholesky_ex(xx)
        solution = torch.cholesky_solve(self.xy, factor) if int(info) == 0 else torch.linalg.lstsq(xx, self.xy).solution
        return solution.T, xx

    def error(self, fitted: Tensor) -> float:
        """Σ ||W̃ x̃ − y||² over these rows, less the Σ ||y||² every candidate shares: compares candidates."""
        return float((fitted @ self.xx * fitted).sum() - 2 * (fitted * self.xy.T).sum())


def _split_rows(
    layer: _Layer, inputs: list[Tensor], targets: list[Tensor], features: int, max_rows: int | None,
) -> tuple[_Moments, _Moments, int]:
    """Moments of the fitting rows and of the held-out rows, and the number of held-out samples: every
    `_HOLD_OUT_EVERY`-th calibration sample (counted across batches) is held out whole, since the positions
    of one sample say much the same."""
    outputs = layer.rows(targets[0]).shape[1]
    fit = _Moments(features, outputs, layer.takes_bias)
    held = _Moments(features, outputs, layer.takes_bias)
    total = sum(layer.rows(t).shape[0] for t in targets)
    share = 1.0 if not max_rows or total <= max_rows else max_rows / total
    generator = torch.Generator().manual_seed(0)
    first_sample = 0
    for x, t in zip(inputs, targets):
        samples = x.shape[0]
        held_samples = (torch.arange(first_sample, first_sample + samples) % _HOLD_OUT_EVERY) == _HOLD_OUT_EVERY - 1
        first_sample += samples
        t_rows = layer.rows(t)
        per_sample = t_rows.shape[0] // samples
        start = 0
        for chunk in layer.features(x, features):
            t_chunk = t_rows[start : start + chunk.shape[0]]
            pick_held = held_samples[torch.arange(start, start + chunk.shape[0]) // per_sample]  # rows are sample-major
            pick_fit = ~pick_held
            start += chunk.shape[0]
            if share < 1.0:  # neighbouring positions of an image say much the same: a random share of them
                sampled = torch.rand(chunk.shape[0], generator=generator) < share
                pick_held, pick_fit = pick_held & sampled, pick_fit & sampled
            fit.add(chunk[pick_fit], t_chunk[pick_fit])
            held.add(chunk[pick_held], t_chunk[pick_held])
    return fit, held, first_sample // _HOLD_OUT_EVERY


def _least_squares(
    layer: _Layer, inputs: list[Tensor], targets: list[Tensor], matrix: Tensor, bias: Tensor, mask: Tensor | None,
    ridge: float, max_rows: int | None = None,
) -> tuple[Tensor, Tensor, int, float | None]:
    """Ridge least squares of [W b] on the rows of (inputs, targets), a random `max_rows` of them when there
    are more; SparseGPT's update after it when `mask` (kept weights) is given.

    The ridge is chosen on held-out samples from `ridge` × 10^k (`_RIDGE_STEPS`) and the fit made again on
    every row with it; where no candidate beats the current weights on the held-out samples, the fit is
    declined (returns ridge None). With fewer than `_MIN_HELD_OUT` held-out samples, `ridge` fits every row.
    A classifier after global pooling has one row per sample: fitting its 1,280 inputs on 512 samples
    matched the calibration set and lost held-out agreement (EfficientNet-Lite0).
    Returns (matrix, bias, rows, ridge chosen)."""
    features = matrix.shape[1]
    fit, held, held_samples = _split_rows(layer, inputs, targets, features, max_rows)
    chosen = ridge
    if held_samples >= _MIN_HELD_OUT and held.rows and fit.rows:
        current = torch.cat([matrix.double(), bias.double()[:, None]], dim=1) if layer.takes_bias else matrix.double()
        errors = {r: held.error(fit.solve(r)[0]) for r in (ridge * 10.0**k for k in _RIDGE_STEPS)}
        chosen = min(errors, key=errors.get)
        if errors[chosen] >= held.error(current):
            return matrix, bias, fit.rows + held.rows, None
    everything = fit + held
    fitted, regularised = everything.solve(chosen)
    if mask is not None:
        width = regularised.shape[0]
        full_mask = torch.cat([mask, torch.ones(mask.shape[0], width - features, dtype=torch.bool)], dim=1)
        fitted = sparsegpt_update(fitted, regularised, full_mask)  # with its own damping on top: measured better
    new_bias = fitted[:, features] if layer.takes_bias else bias.double()
    return fitted[:, :features].to(matrix.dtype), new_bias.to(bias.dtype), everything.rows, chosen


def _fit_layer(
    planned: _Planned, inputs: list[Tensor], targets: list[Tensor], mode: str, ridge: float, max_rows: int | None,
) -> tuple[LayerFit, Tensor, Tensor]:
    """Fit one layer; returns the record and the parameters to use from now on (matrix, bias vector)."""
    layer = planned.layer
    stored = layer.stored_weight()
    matrix = layer.matrix(stored.double()).to(stored.dtype)
    bias = layer.bias_vector(layer.stored_bias(), matrix.shape[0], matrix.dtype)
    before_outputs = [layer.complete(layer.node_output(x, matrix, bias), bias) for x in inputs]
    before = _relative_error(before_outputs, targets)
    method = "bias" if mode == "bias" or layer.groups != 1 else ("sparsegpt" if planned.sparse else "ls")
    chosen = None
    if method == "bias":
        if not layer.takes_bias:
            return LayerFit(layer.node.name, layer.op_type, method, before, before, 0, False, declined="no bias"), matrix, bias
        residual = [layer.rows(t.double() - y.double()) for t, y in zip(targets, before_outputs)]
        rows = sum(r.shape[0] for r in residual)
        new_matrix, new_bias = matrix, bias + (sum(r.sum(0) for r in residual) / rows).to(bias.dtype)
    else:
        mask = matrix != 0 if planned.sparse else None
        new_matrix, new_bias, rows, chosen = _least_squares(layer, inputs, targets, matrix, bias, mask, ridge, max_rows)
        if chosen is None:
            fit = LayerFit(layer.node.name, layer.op_type, method, before, before, rows, False, declined="worse on held-out samples")
            return fit, matrix, bias
    del before_outputs
    after = _relative_error([layer.complete(layer.node_output(x, new_matrix, new_bias), new_bias) for x in inputs], targets)
    if after > before:
        return LayerFit(layer.node.name, layer.op_type, method, before, before, rows, False, chosen, "no better"), matrix, bias
    return LayerFit(layer.node.name, layer.op_type, method, before, after, rows, ridge=chosen), new_matrix, new_bias


def reconstruct(
    model: ir.Model, reference: DenseReference, batches: list[dict[str, np.ndarray]], mode: str = "ls",
    ridge: float = 1e-2, dense_batches: list[dict[str, np.ndarray]] | None = None, layers: set[str] | None = None,
    max_rows: int | None = DEFAULT_MAX_ROWS,
) -> ReconstructionReport:
    """Re-fit `model`'s reduced layers in place on `batches` against `reference` (see the module docstring).

    `dense_batches` feed the reference instead of `batches` where the two models' inputs differ: a
    sub-model entered from an already pruned network takes the pruned activations, its dense twin the
    dense ones. `layers` (node names) restricts the fit to those layers; the others keep their weights.
    `max_rows` caps the rows (samples times output positions) a least-squares fit accumulates: a random
    share of a convolution's positions is taken when there are more.
    """
    if mode not in RECONSTRUCTION_METHODS:
        raise InvalidRequestError(f"reconstruction mode must be one of {', '.join(RECONSTRUCTION_METHODS)}, got {mode!r}")
    start = time.perf_counter()
    plan = _plan(model, reference)
    if layers is not None:
        plan = {name: planned for name, planned in plan.items() if name in layers}
    feeds = _tensors(batches)
    samples = sum(len(next(iter(batch.values()))) for batch in batches) if batches else 0
    report = ReconstructionReport(mode, 0.0, samples)
    if plan:
        pruned = _Walk(model, feeds)
        dense = _Walk(reference.model, feeds if dense_batches is None else _tensors(dense_batches), pinned=set(plan))
        last = max(index for index, node in enumerate(pruned.nodes) if node.name in plan)
        with torch.no_grad():
            for index, node in enumerate(pruned.nodes[: last + 1]):  # nothing after the last fitted layer changes
                planned = plan.get(node.name)
                dense_node = dense.run_through(node.name) if planned is not None else None
                if dense_node is None:
                    pruned.execute(index)
                    continue
                targets = _dense_targets(planned, dense, dense_node)
                inputs = pruned.get(node.inputs[0].name)
                fit, matrix, bias = _fit_layer(planned, inputs, targets, mode, ridge, max_rows)
                del targets
                report.layers.append(fit)
                layer = planned.layer
                outputs = [layer.node_output(x, matrix, bias) for x in inputs]
                if layer.bias_after and layer.bias is not None:  # the Add after the MatMul reads the new bias
                    old = pruned.constants[layer.bias.name]
                    pruned.constants[layer.bias.name] = bias.to(old.dtype).reshape(old.shape)
                elif layer.bias_after:  # a MatMul's bias with no Add yet: added here, as the Add written below will
                    outputs = [layer.complete(y, bias) for y in outputs]
                pruned.execute(index, outputs)
                if fit.applied:
                    _write(model, layer, matrix, bias)
    report.seconds = time.perf_counter() - start
    return report


def _tensors(batches: list[dict[str, np.ndarray]]) -> list[dict[str, Tensor]]:
    return [{name: torch.from_numpy(np.asarray(array)) for name, array in batch.items()} for batch in batches]


def _dense_targets(planned: _Planned, dense: _Walk, dense_node: ir.Node) -> list[Tensor]:
    """The dense layer's outputs (bias included) at the pruned layer's output channels."""
    layer = planned.dense
    bias = layer.bias_vector(layer.stored_bias(), layer.weight.const_value.shape[layer.out_axis], torch.float64)
    kept = torch.from_numpy(planned.kept_outputs)
    axis = layer.channel_axis
    targets = []
    for y in dense.take(dense_node.outputs[0].name):
        full = layer.complete(y, bias.to(y.dtype))
        targets.append(full.index_select(axis if axis >= 0 else full.dim() + axis, kept))
    return targets


# ------------------------------------------------------------------------------------------------
# writing the fitted parameters into the IR


def _initializer(graph: ir.Graph, base: str, array: np.ndarray) -> ir.Value:
    taken = set(graph.initializers) | {v.name for node in graph for v in node.outputs} | {v.name for v in graph.inputs}
    name, n = base, 1
    while name in taken:
        name, n = f"{base}_{n}", n + 1
    value = ir.Value(name=name, const_value=ir.tensor(np.ascontiguousarray(array), name=name))
    value.shape = ir.Shape(array.shape)
    value.dtype = value.const_value.dtype
    graph.register_initializer(value)
    return value


def _write(model: ir.Model, layer: _Layer, matrix: Tensor, bias: Tensor) -> None:
    """Store the fitted weight and bias; a layer that had no bias gets one (Conv/Gemm input, or an Add)."""
    graph = model.graph
    dtype = layer.weight.const_value.numpy().dtype
    layer.weight.const_value = ir.tensor(
        np.ascontiguousarray(layer.stored_from(matrix.double()).numpy().astype(dtype)), name=layer.weight.name
    )
    if not layer.takes_bias:
        return
    vector = (bias.double() / layer.bias_scale).numpy().astype(dtype)
    if layer.bias is not None:
        shape = tuple(layer.bias.const_value.shape)
        layer.bias.const_value = ir.tensor(np.ascontiguousarray(vector.reshape(shape)), name=layer.bias.name)
        return
    value = _initializer(graph, f"{layer.weight.name}_bias", vector)
    node = layer.node
    if not layer.bias_after:
        node.resize_inputs(3)
        node.replace_input_with(2, value)
        return
    output = node.outputs[0]
    add = ir.node("Add", [output, value], name=f"{node.name}_bias")
    added = add.outputs[0]
    added.shape, added.type = output.shape, output.type
    for user, index in output.uses():
        if user is not add:
            user.replace_input_with(index, added)
    if output in graph.outputs:  # the model's output keeps its name
        position = list(graph.outputs).index(output)
        added.name, output.name = output.name, f"{output.name}_unbiased"
        graph.outputs[position] = added
    else:
        added.name = f"{output.name}_biased"
    graph.insert_after(node, add)
    layer.bias, layer.bias_after = value, True


@dataclass
class Reconstruct(ir.passes.InPlacePass):
    """Transform: re-fit the layers after pruned units/zeroed weights against the kept `DenseReference`
    (`ls`: least squares, SparseGPT for sparse weights; `bias`: bias compensation). Stores `ReconstructionReport`."""

    calibration: CalibrationData = field(repr=False)
    mode: str = "ls"
    ridge: float = 1e-2  # Fashion-MNIST CNN at 50%: top-1 the same at 1e-3; SparseGPT after it needs this much
    max_rows: int | None = DEFAULT_MAX_ROWS  # None: every position of every sample

    def requires(self, model: ir.Model) -> None:
        if self.mode not in RECONSTRUCTION_METHODS:
            raise InvalidRequestError(f"--reconstruct must be one of {', '.join(RECONSTRUCTION_METHODS)}, got {self.mode!r}")
        if self.calibration.synthetic:
            raise InvalidRequestError("reconstruction needs real calibration data (--calib), not random inputs")
        if self.ridge < 0:
            raise InvalidRequestError(f"the reconstruction ridge must be >= 0, got {self.ridge}")
        fetch(model, DenseReference)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        reference = fetch(model, DenseReference)
        batches = list(self.calibration)
        unfitted = model.clone()  # tensors are shared, not copied: transforms replace them
        report = reconstruct(model, reference, batches, self.mode, self.ridge, max_rows=self.max_rows)
        if any(f.applied for f in report.layers):
            report.output_distortion = _output_distortions(reference.model, unfitted, model, batches)
            if report.output_distortion[1] > report.output_distortion[0]:
                model.graph = unfitted.graph  # every fit helped its own layer, and together they hurt the output
                report.reverted = True
        store(model, report)
        return ir.passes.PassResult(model, modified=any(f.applied for f in report.layers) and not report.reverted)


def _output_distortions(dense: ir.Model, before: ir.Model, after: ir.Model, batches: list) -> tuple[float, float]:
    """The first output's distortion against the dense model's (KL for logits, else relative squared error),
    on the calibration batches, before and after the fits (later outputs, a pruned KV cache, differ in shape)."""
    from pcc.backends.onnx.runtime import session
    from pcc.passes.analysis.sensitivity import output_distortion, resolve_metric

    def first_outputs(model: ir.Model) -> list[list[np.ndarray]]:
        sess = session(ir.serde.serialize_model(model).SerializeToString())
        name = sess.get_outputs()[0].name
        return [sess.run([name], feeds) for feeds in batches]

    reference = first_outputs(dense)
    metric = resolve_metric("auto", reference)
    return (output_distortion(reference, first_outputs(before), metric),
            output_distortion(reference, first_outputs(after), metric))
