"""SparsifyWeights: zero most of each layer's weights in a pattern a sparse kernel can exploit.

Channel pruning removes whole units and needs nothing special to run fast; sparse weights stay in
place, mostly zero, and pay off only on kernels that skip the zeros (the TVM backend's BSR kernels).
The pattern decides which kernels can: `unstructured` (any element; the most accurate, the hardest to
run fast), `nm:N:M` (N of every M consecutive weights along the reduction axis kept, the Ampere 2:4
shape), `block:RxC` (R output rows x C reduction columns zeroed together; 16x1 vectorises along the
output rows on a CPU).

Every weight is viewed as a matrix [outputs, reduction]: a MatMul weight [K, N] transposed, a Gemm B as
its transB says, a Conv weight [O, I, kh, kw] as [O, I*kh*kw]. Blocks are scored by their L2 norm; edge
blocks of shapes that are not a multiple of the block are partial and count their real elements.

How much each layer loses comes from an allocator, as for channels: `uniform` (every layer the same
fraction), `global` (one magnitude threshold over all layers: mean square per block), `lamp` (LAMP scores
per layer, one global threshold: bounds each layer's output distortion, Lee et al. 2021). N:M fixes the
sparsity at 1 - N/M in every layer it fits; a layer whose reduction axis is not a multiple of M is
reported and left dense.

Which weights go is the `criterion`: magnitude (`l2`, the default: blocks by their mean square; `l1`:
by their mean |w|; for single elements both are |w|), or one of two criteria for large language models
that read calibration data (MatMul/Gemm only, `uniform` allocation, unstructured or N:M):

- `wanda` (Sun et al. 2023): |W_ij| · ‖X_j‖₂, the weight times the L2 norm of its input feature over every
  calibration token, compared within each output row (each row loses the same fraction; N:M within each
  group of M of a row). A few input features of an LLM carry activations orders of magnitude larger than
  the rest, so their small weights matter more than large weights on quiet features.
- `sparsegpt` (Frantar & Alistarh 2023): SparseGPT's OBS mask and weight update (`sparsegpt.py`) from
  H = Σ x xᵀ of the layer's inputs.

Both walk the model once, layer by layer in graph order, over all calibration batches: each layer's
statistics come from the inputs of the model *as sparsified so far* (the earlier layers' errors are
then what the later ones see and, for SparseGPT, correct), accumulated batch by batch into Σx² or Σxxᵀ,
so memory holds one layer's frontier of activations, never every layer's. The walk stops after the
last layer it sparsifies (an LLM's logits over the whole vocabulary are never computed).

`exclude_outputs` leaves dense the layers that write a model output: an LLM's head, whose weight is
the token embedding in most models (SmolLM2 ties them), so sparsifying it would also change the input
embedding of a model that re-ties them, and whose output is the whole vocabulary's logits.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from pcc.compiler.errors import InvalidRequestError
from pcc.compiler.options import SPARSIFY_ALLOCATORS, SPARSIFY_CRITERIA, check_sparsity
from pcc.passes.analysis.importance import lamp_within
from pcc.passes.results import store

if TYPE_CHECKING:
    from pcc.compiler.calibration import CalibrationData

__all__ = [
    "CALIBRATED_CRITERIA",
    "SPARSIFY_ALLOCATORS",
    "SPARSIFY_CRITERIA",
    "LayerSparsity",
    "SparseLayer",
    "SparsityPattern",
    "SparsifyReport",
    "SparsifyWeights",
    "sparse_weight_layers",
]

CALIBRATED_CRITERIA = ("wanda", "sparsegpt")  # read the layers' inputs on calibration data


@dataclass(frozen=True)
class SparsityPattern:
    kind: str  # unstructured | nm | block
    n: int = 1
    m: int = 1
    rows: int = 1  # block height, along the outputs
    cols: int = 1  # block width, along the reduction

    @classmethod
    def parse(cls, text: str) -> SparsityPattern:
        """`unstructured`, `nm:N:M` or `block:RxC`."""
        if text == "unstructured":
            return cls("unstructured")
        if match := re.fullmatch(r"nm:(\d+):(\d+)", text):
            n, m = int(match[1]), int(match[2])
            if not 0 < n < m:
                raise InvalidRequestError(f"--sparsify {text}: N:M needs 0 < N < M")
            return cls("nm", n=n, m=m)
        if match := re.fullmatch(r"block:(\d+)x(\d+)", text):
            rows, cols = int(match[1]), int(match[2])
            if rows < 1 or cols < 1:
                raise InvalidRequestError(f"--sparsify {text}: block sides must be positive")
            return cls("block", rows=rows, cols=cols)
        raise InvalidRequestError(f"--sparsify must be unstructured, nm:N:M or block:RxC, got {text!r}")

    def __str__(self) -> str:
        return {"unstructured": "unstructured", "nm": f"nm:{self.n}:{self.m}", "block": f"block:{self.rows}x{self.cols}"}[self.kind]


@dataclass(frozen=True)
class SparseLayer:
    """A weight seen as [outputs, reduction]."""

    node: str
    op_type: str
    weight: ir.Value
    transposed: bool  # the stored array is [reduction, outputs] (MatMul, Gemm without transB)

    def matrix(self) -> np.ndarray:
        array = self.weight.const_value.numpy()
        return array.T if self.transposed else array.reshape(array.shape[0], -1)

    def write(self, matrix: np.ndarray) -> None:
        array = self.weight.const_value.numpy()
        stored = matrix.T if self.transposed else matrix.reshape(array.shape)
        self.weight.const_value = ir.tensor(np.ascontiguousarray(stored, dtype=array.dtype), name=self.weight.name)


def sparse_weight_layers(model: ir.Model) -> list[SparseLayer]:
    """MatMul/Gemm with a constant 2-D weight and Conv with a constant weight: what sparsity applies to."""
    layers = []
    for node in model.graph:
        if node.op_type == "MatMul" and len(node.inputs) == 2:
            weight, transposed = node.inputs[1], True
            rank_ok = weight is not None and weight.const_value is not None and len(weight.const_value.shape) == 2
        elif node.op_type == "Gemm":
            weight = node.inputs[1]
            transposed = not node.attributes.get_int("transB", 0)
            rank_ok = weight is not None and weight.const_value is not None and not node.attributes.get_int("transA", 0)
        elif node.op_type == "Conv":
            weight, transposed = node.inputs[1], False
            rank_ok = weight is not None and weight.const_value is not None
        else:
            continue
        if rank_ok and weight.is_initializer() and np.issubdtype(weight.const_value.numpy().dtype, np.floating):
            layers.append(SparseLayer(node.name, node.op_type, weight, transposed))
    return layers


@dataclass
class LayerSparsity:
    node: str
    op_type: str
    weight: str
    shape: tuple[int, ...]  # the [outputs, reduction] view
    sparsity: float  # fraction of the weight's elements now zero
    skipped: str | None = None  # why the pattern was not applied
    error: float | None = None  # ‖ΔW X‖² / ‖W X‖² on the calibration inputs (sparsegpt), else None


@dataclass
class SparsifyReport:
    META_KEY = "pcc.sparsify_report"
    PRODUCED_BY = "SparsifyWeights"

    pattern: str
    allocator: str
    target: float
    layers: list[LayerSparsity]
    criterion: str = "l2"

    @property
    def achieved(self) -> float:
        total = sum(int(np.prod(layer.shape)) for layer in self.layers)
        zeros = sum(layer.sparsity * int(np.prod(layer.shape)) for layer in self.layers)
        return zeros / total if total else 0.0

    def summary(self) -> str:
        lines = [f"{self.pattern} ({self.allocator}, {self.criterion}): {100 * self.achieved:.1f}% of the layers' weights are zero"]
        errors = [layer.error for layer in self.layers if layer.error is not None]
        if errors:
            lines.append(f"  output error of the sparsified layers on the calibration data: mean {np.mean(errors):.3g}, max {max(errors):.3g}")
        lines += [f"  {layer.node}: left dense ({layer.skipped})" for layer in self.layers if layer.skipped]
        return "\n".join(lines)


def _block_scores(matrix: np.ndarray, rows: int, cols: int, power: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """(sum of |w|^power, element count) per block, edge blocks partial."""
    out, red = matrix.shape
    padded = np.zeros((-(-out // rows) * rows, -(-red // cols) * cols))
    padded[:out, :red] = matrix
    shape = (padded.shape[0] // rows, rows, padded.shape[1] // cols, cols)
    squares = (np.abs(padded) ** power).reshape(shape).sum(axis=(1, 3))
    present = np.zeros_like(padded)
    present[:out, :red] = 1
    return squares, present.reshape(shape).sum(axis=(1, 3))


def _expand_blocks(keep: np.ndarray, rows: int, cols: int, shape: tuple[int, int]) -> np.ndarray:
    return np.repeat(np.repeat(keep, rows, axis=0), cols, axis=1)[: shape[0], : shape[1]]


def _lowest(values: np.ndarray, sizes: np.ndarray, fraction: float) -> np.ndarray:
    """Which entries go: the lowest `values`, as many as remove `fraction` of the summed `sizes`."""
    order = np.argsort(values, kind="stable")
    removed = np.zeros(values.size, dtype=bool)
    removed[order[np.cumsum(sizes[order]) <= fraction * sizes.sum() + 1e-9]] = True
    return removed


def _row_mask(scores: np.ndarray, fraction: float) -> np.ndarray:
    """Kept entries: each row's lowest-scoring `fraction` goes (Wanda's per-output comparison)."""
    drop = int(round(fraction * scores.shape[1]))
    keep = np.ones(scores.shape, dtype=bool)
    np.put_along_axis(keep, np.argsort(scores, axis=1, kind="stable")[:, :drop], False, axis=1)
    return keep


def _nm_mask(matrix: np.ndarray, n: int, m: int) -> np.ndarray:
    groups = np.abs(matrix).reshape(matrix.shape[0], -1, m)
    order = np.argsort(-groups, axis=2, kind="stable")
    keep = np.zeros_like(groups, dtype=bool)
    np.put_along_axis(keep, order[:, :, :n], True, axis=2)
    return keep.reshape(matrix.shape)


@dataclass
class SparsifyWeights(ir.passes.InPlacePass):
    """Transform: zero `sparsity` of the weights of every MatMul/Gemm/Conv in `pattern`, split across layers
    by `allocator` (uniform, global, lamp), chosen by `criterion` (l1, l2; wanda, sparsegpt on
    `calibration`). N:M patterns ignore `sparsity` (they fix it). `exclude_outputs` leaves the layers that
    write a model output dense (an LLM's head); `only` restricts the pass to the layers of those weights."""

    pattern: str = "unstructured"
    sparsity: float = 0.0
    allocator: str = "uniform"
    criterion: str = "l2"
    calibration: CalibrationData | None = field(default=None, repr=False)
    exclude_outputs: bool = False
    only: tuple[str, ...] | None = None  # weight names: sparsify these layers alone (None: every layer)
    report: SparsifyReport | None = field(default=None, init=False)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        check_sparsity(self.sparsity)
        if self.allocator not in SPARSIFY_ALLOCATORS:
            raise InvalidRequestError(
                f"--allocator {self.allocator} does not apply to --sparsify; choose from {', '.join(SPARSIFY_ALLOCATORS)}"
            )
        if self.criterion not in SPARSIFY_CRITERIA:
            raise InvalidRequestError(
                f"--importance {self.criterion} does not apply to --sparsify; choose from {', '.join(SPARSIFY_CRITERIA)}"
            )
        pattern = SparsityPattern.parse(self.pattern)
        layers = sparse_weight_layers(model)
        if not layers:
            raise InvalidRequestError("--sparsify found no MatMul, Gemm or Conv with a constant weight to sparsify")
        skipped: dict[str, str] = {}
        if self.exclude_outputs:
            outputs = {id(v) for v in model.graph.outputs}
            writers = {node.name for node in model.graph if any(id(v) in outputs for v in node.outputs)}
            skipped.update((layer.node, "writes a model output (kept dense)") for layer in layers if layer.node in writers)
        if self.only is not None:
            skipped.update((layer.node, "not selected") for layer in layers if layer.weight.name not in self.only)
        if pattern.kind == "nm":
            skipped.update((layer.node, f"reduction axis {layer.matrix().shape[1]} is not a multiple of M={pattern.m}")
                           for layer in layers if layer.matrix().shape[1] % pattern.m and layer.node not in skipped)
        chosen = [layer for layer in layers if layer.node not in skipped]
        if self.criterion in CALIBRATED_CRITERIA:
            errors = self._calibrated(model, pattern, chosen, skipped)
        else:
            self._magnitude(pattern, chosen)
            errors = {}
        results = []
        for layer in layers:
            matrix = layer.matrix()
            results.append(LayerSparsity(layer.node, layer.op_type, layer.weight.name, matrix.shape,
                                         float((matrix == 0).mean()), skipped.get(layer.node), errors.get(layer.node)))
        allocator = self.allocator if pattern.kind != "nm" else "fixed"
        self.report = SparsifyReport(str(pattern), allocator, self.sparsity, results, self.criterion)
        store(model, self.report)
        return ir.passes.PassResult(model, any(r.sparsity > 0 for r in results))

    def _magnitude(self, pattern: SparsityPattern, layers: list[SparseLayer]) -> None:
        matrices = [layer.matrix().astype(np.float64) for layer in layers]
        if pattern.kind == "nm":
            masks = [_nm_mask(matrix, pattern.n, pattern.m) for matrix in matrices]
        else:
            masks = self._ranked(pattern, matrices)
        for layer, mask in zip(layers, masks):
            if not mask.all():
                layer.write(np.where(mask, layer.matrix(), 0))

    def _ranked(self, pattern: SparsityPattern, matrices: list[np.ndarray]) -> list[np.ndarray]:
        """Block (or element: 1x1 blocks) masks: each layer's lowest-scoring blocks go, as many as the
        allocator gives it."""
        rows, cols = (pattern.rows, pattern.cols) if pattern.kind == "block" else (1, 1)
        scored = [_block_scores(m, rows, cols, 1 if self.criterion == "l1" else 2) for m in matrices]
        if self.allocator == "uniform":
            keeps = [
                ~_lowest(squares.ravel() / counts.ravel(), counts.ravel(), self.sparsity).reshape(squares.shape)
                for squares, counts in scored
            ]
        else:
            keeps = self._global_keep(scored)
        return [_expand_blocks(keep, rows, cols, m.shape) for keep, m in zip(keeps, matrices)]

    def _global_keep(self, scored: list[tuple[np.ndarray, np.ndarray]]) -> list[np.ndarray]:
        """One threshold over every layer's blocks: on mean squares (global) or per-layer LAMP scores."""
        if self.allocator == "lamp":
            values = [lamp_within(squares.ravel()) for squares, _ in scored]
        else:
            values = [(squares / counts).ravel() for squares, counts in scored]
        removed = _lowest(np.concatenate(values), np.concatenate([c.ravel() for _, c in scored]), self.sparsity)
        keeps, start = [], 0
        for squares, _ in scored:
            keeps.append(~removed[start : start + squares.size].reshape(squares.shape))
            start += squares.size
        return keeps

    def _calibrated(
        self, model: ir.Model, pattern: SparsityPattern, layers: list[SparseLayer], skipped: dict[str, str],
    ) -> dict[str, float]:
        """Wanda or SparseGPT, layer by layer in graph order on the calibration data (see the module
        docstring); writes the weights, notes the layers it leaves dense in `skipped`, returns SparseGPT's
        per-layer output errors."""
        import torch

        from pcc.passes.transforms.reconstruct import _Walk
        from pcc.passes.transforms.sparsegpt import sparsegpt_prune

        flag = f"--importance {self.criterion}"
        if self.calibration is None or self.calibration.synthetic:
            raise InvalidRequestError(f"{flag} reads the layers' inputs: it needs calibration data (--calib)")
        if self.allocator != "uniform":
            raise InvalidRequestError(f"{flag} sparsifies every layer alike: --allocator {self.allocator} does not apply")
        if pattern.kind == "block":
            raise InvalidRequestError(f"{flag} makes unstructured or N:M sparsity, not {pattern}")
        wanted = {}
        for layer in layers:
            if layer.op_type == "Conv":
                skipped[layer.node] = f"{flag} applies to MatMul/Gemm weights"
            else:
                wanted[layer.node] = layer
        feeds = [{k: torch.from_numpy(np.asarray(v)) for k, v in batch.items()} for batch, _ in self.calibration.batches()]
        walk = _Walk(model, feeds)
        last = max((i for i, node in enumerate(walk.nodes) if node.name in wanted), default=-1)
        statistics: dict[str, torch.Tensor] = {}  # input value -> Σx² (wanda) or Σxxᵀ (sparsegpt)
        errors = {}
        with torch.no_grad():
            for index in range(last + 1):
                node = walk.nodes[index]
                layer = wanted.get(node.name)
                if layer is not None:
                    source = node.inputs[0].name
                    statistics = {k: v for k, v in statistics.items() if k in walk.values}  # inputs still live
                    if source not in statistics:
                        statistics[source] = _input_statistics(walk.get(source), full=self.criterion == "sparsegpt")
                    weight = torch.from_numpy(layer.matrix().astype(np.float32))
                    if self.criterion == "wanda":
                        scores = np.abs(weight.numpy()) * statistics[source].sqrt().numpy()[None, :]
                        keep = _nm_mask(scores, pattern.n, pattern.m) if pattern.kind == "nm" else _row_mask(scores, self.sparsity)
                        layer.write(np.where(keep, weight.numpy(), 0))
                    else:
                        hessian = statistics[source]
                        n_m = (pattern.n, pattern.m) if pattern.kind == "nm" else None
                        updated, _ = sparsegpt_prune(weight, hessian, sparsity=None if n_m else self.sparsity, n_m=n_m)
                        errors[node.name] = _output_error(weight.double(), updated.double(), hessian)
                        layer.write(updated.numpy())
                    walk.constants[layer.weight.name] = torch.from_numpy(np.array(layer.weight.const_value.numpy()))
                walk.execute(index)
        return errors


def _input_statistics(batches, full: bool):
    """Σ x xᵀ (`full`) or Σ x² per feature of a layer input, over every token of every batch, in float64."""
    import torch

    features = batches[0].shape[-1]
    total = torch.zeros((features, features) if full else features, dtype=torch.float64)
    for x in batches:
        rows = x.reshape(-1, features).float()
        total += (rows.T @ rows).double() if full else rows.square().sum(0, dtype=torch.float64)
    return total


def _output_error(dense, sparse, hessian) -> float:
    """‖(W − W') X‖² / ‖W X‖² from H = Σ x xᵀ: tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)."""
    delta = dense - sparse
    den = float(((dense @ hessian) * dense).sum())
    return float(((delta @ hessian) * delta).sum()) / den if den > 0 else 0.0
