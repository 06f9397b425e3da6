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
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from pcc.compiler.errors import InvalidRequestError
from pcc.compiler.options import SPARSIFY_ALLOCATORS, check_sparsity
from pcc.passes.analysis.importance import lamp_within
from pcc.passes.results import store

__all__ = ["SparsityPattern", "SparsifyReport", "SparsifyWeights", "SPARSIFY_ALLOCATORS", "sparse_weight_layers"]



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


@dataclass
class SparsifyReport:
    META_KEY = "pcc.sparsify_report"
    PRODUCED_BY = "SparsifyWeights"

    pattern: str
    allocator: str
    target: float
    layers: list[LayerSparsity]

    @property
    def achieved(self) -> float:
        total = sum(int(np.prod(layer.shape)) for layer in self.layers)
        zeros = sum(layer.sparsity * int(np.prod(layer.shape)) for layer in self.layers)
        return zeros / total if total else 0.0

    def summary(self) -> str:
        lines = [f"{self.pattern} ({self.allocator}): {100 * self.achieved:.1f}% of the layers' weights are zero"]
        lines += [f"  {layer.node}: left dense ({layer.skipped})" for layer in self.layers if layer.skipped]
        return "\n".join(lines)


def _block_scores(matrix: np.ndarray, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """(sum of squares, element count) per block, edge blocks partial."""
    out, red = matrix.shape
    padded = np.zeros((-(-out // rows) * rows, -(-red // cols) * cols))
    padded[:out, :red] = matrix
    shape = (padded.shape[0] // rows, rows, padded.shape[1] // cols, cols)
    squares = (padded**2).reshape(shape).sum(axis=(1, 3))
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


def _nm_mask(matrix: np.ndarray, n: int, m: int) -> np.ndarray:
    groups = np.abs(matrix).reshape(matrix.shape[0], -1, m)
    order = np.argsort(-groups, axis=2, kind="stable")
    keep = np.zeros_like(groups, dtype=bool)
    np.put_along_axis(keep, order[:, :, :n], True, axis=2)
    return keep.reshape(matrix.shape)


@dataclass
class SparsifyWeights(ir.passes.InPlacePass):
    """Transform: zero `sparsity` of the weights of every MatMul/Gemm/Conv in `pattern`, split across layers
    by `allocator` (uniform, global, lamp). N:M patterns ignore `sparsity` (they fix it)."""

    pattern: str = "unstructured"
    sparsity: float = 0.0
    allocator: str = "uniform"
    report: SparsifyReport | None = field(default=None, init=False)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        check_sparsity(self.sparsity)
        if self.allocator not in SPARSIFY_ALLOCATORS:
            raise InvalidRequestError(
                f"--allocator {self.allocator} does not apply to --sparsify; choose from {', '.join(SPARSIFY_ALLOCATORS)}"
            )
        pattern = SparsityPattern.parse(self.pattern)
        layers = sparse_weight_layers(model)
        if not layers:
            raise InvalidRequestError("--sparsify found no MatMul, Gemm or Conv with a constant weight to sparsify")
        matrices = [layer.matrix().astype(np.float64) for layer in layers]
        if pattern.kind == "nm":
            masks, skipped = self._nm(pattern, matrices)
        else:
            masks, skipped = self._ranked(pattern, matrices), [None] * len(layers)
        results = []
        for layer, matrix, mask, reason in zip(layers, matrices, masks, skipped):
            if mask is not None and not mask.all():
                layer.write(np.where(mask, layer.matrix(), 0))
            zeros = float((layer.matrix() == 0).mean())
            results.append(LayerSparsity(layer.node, layer.op_type, layer.weight.name, matrix.shape, zeros, reason))
        self.report = SparsifyReport(str(pattern), self.allocator if pattern.kind != "nm" else "fixed", self.sparsity, results)
        store(model, self.report)
        return ir.passes.PassResult(model, any(r.sparsity > 0 for r in results))

    @staticmethod
    def _nm(pattern: SparsityPattern, matrices: list[np.ndarray]):
        masks, skipped = [], []
        for matrix in matrices:
            if matrix.shape[1] % pattern.m:
                masks.append(None)
                skipped.append(f"reduction axis {matrix.shape[1]} is not a multiple of M={pattern.m}")
            else:
                masks.append(_nm_mask(matrix, pattern.n, pattern.m))
                skipped.append(None)
        return masks, skipped

    def _ranked(self, pattern: SparsityPattern, matrices: list[np.ndarray]) -> list[np.ndarray]:
        """Block (or element: 1x1 blocks) masks: each layer's lowest-scoring blocks go, as many as the
        allocator gives it."""
        rows, cols = (pattern.rows, pattern.cols) if pattern.kind == "block" else (1, 1)
        scored = [_block_scores(m, rows, cols) for m in matrices]
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
